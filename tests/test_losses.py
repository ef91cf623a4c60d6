import pytest
import torch

from npedit.losses import dmd_loss, do_nothing_loss, flow_matching_loss, target_loss, vlm_loss


def test_dmd_gradient_zero_when_teacher_and_critic_agree():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    real = torch.randn(2, 4, 8, 8)
    loss, _ = dmd_loss(x, real, real.clone())
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dmd_gradient_equals_g_over_numel():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    real, fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss, _ = dmd_loss(x, real, fake)
    loss.backward()
    w = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = (fake - real) / w
    torch.testing.assert_close(x.grad, g / x.numel())


def test_flow_matching_zero_at_true_velocity():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert flow_matching_loss(eps - x0, x0, eps)[0] == 0
    assert flow_matching_loss(torch.zeros_like(x0), x0, eps)[0] > 0


def test_vlm_loss_yes_no_is_bce_on_margin():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])  # (B=1, Q=2, [No, Yes])
    expected = torch.tensor([[True, False]])
    loss, m = vlm_loss(logits, torch.log_softmax(logits, -1), expected)
    want = (-torch.nn.functional.logsigmoid(torch.tensor(2.0)) - torch.nn.functional.logsigmoid(torch.tensor(2.0))) / 2
    torch.testing.assert_close(loss, want)
    hot, _ = vlm_loss(logits, logits, expected, temperature=0.1)
    assert hot > loss  # a low temperature softens the margin


def test_vlm_loss_full_vocab_and_weights():
    vocab_lp = torch.log(torch.tensor([[[0.2, 0.5]], [[0.3, 0.1]]]))  # (B=2, Q=1, 2)
    expected = torch.tensor([[True], [False]])
    loss, _ = vlm_loss(torch.zeros(2, 1, 2), vocab_lp, expected, mode="full_vocab")
    torch.testing.assert_close(loss, -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.3))) / 2)
    only_first, _ = vlm_loss(torch.zeros(2, 1, 2), vocab_lp, expected, mode="full_vocab", weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(only_first, -torch.log(torch.tensor(0.5)))


def test_vlm_loss_question_mask_ignores_padding_slots():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0], [5.0, -5.0]], [[0.0, 1.0], [0.0, 3.0], [0.0, 3.0]]])
    expected = torch.ones(2, 3, dtype=torch.bool)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, m = vlm_loss(logits, logits, expected, question_mask=mask)
    per_q = -torch.nn.functional.logsigmoid(logits[..., 1] - logits[..., 0])
    torch.testing.assert_close(loss, (per_q[0, :2].mean() + per_q[1].mean()) / 2)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([-9.0, 9.0])  # only the padding slot moves: nothing changes
    torch.testing.assert_close(vlm_loss(changed, changed, expected, question_mask=mask)[0], loss)
    torch.testing.assert_close(m["vlm_p_expected"], torch.sigmoid((logits[..., 1] - logits[..., 0])[mask]).mean())


def test_vlm_loss_gradient_raises_expected_answer():
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    loss, _ = vlm_loss(logits, logits, torch.tensor([[True, False]]))
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 < logits.grad[0, 0, 0]  # push Yes up for the first question
    assert logits.grad[0, 1, 0] < 0 < logits.grad[0, 1, 1]  # and No up for the second


def test_do_nothing_masked():
    x, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert do_nothing_loss(x, ref, torch.tensor([False, False]))[0] == 0
    torch.testing.assert_close(do_nothing_loss(x, ref, torch.tensor([True, False]))[0], torch.tensor(0.5))


def test_target_loss_trains_only_the_samples_with_a_target():
    target = torch.randn(3, 4, 2, 2)
    x = target.clone().requires_grad_(True)
    assert target_loss(x, target, torch.tensor([True, True, True]))[0] == 0  # already there: nothing to learn
    x = torch.zeros(3, 4, 2, 2, requires_grad=True)
    loss, metrics = target_loss(x, torch.ones(3, 4, 2, 2), torch.tensor([True, False, True]))
    torch.testing.assert_close(loss, torch.tensor(2 / 3))
    torch.testing.assert_close(metrics["target_loss"], loss)
    loss.backward()
    assert torch.count_nonzero(x.grad[1]) == 0 and (x.grad[0] < 0).all()  # descent moves x[0] up toward 1


def test_target_loss_edit_weight_counts_the_changed_positions_more():
    """With edit_weight w, a position where the target differs most from the reference weighs 1 + w, an unchanged
    one 1; w = 0 is the plain loss, and the weights need the reference."""
    reference = torch.zeros(2, 4, 2, 2)
    target = reference.clone()
    target[:, :, 0, 0] = 2.0  # the edit changes one position of four
    x = torch.zeros(2, 4, 2, 2, requires_grad=True)
    plain, _ = target_loss(x, target, torch.tensor([True, True]))
    same, _ = target_loss(x, target, torch.tensor([True, True]), reference=reference, edit_weight=0.0)
    torch.testing.assert_close(plain, same)
    weighted, _ = target_loss(x, target, torch.tensor([True, True]), reference=reference, edit_weight=3.0)
    torch.testing.assert_close(weighted, 4 * plain)  # the only error sits where the weight is 1 + 3
    off = target.clone()  # an error away from the edit keeps weight 1
    off[:, :, 1, 1] = 1.0
    a, _ = target_loss(off, target, torch.tensor([True, True]), reference=reference, edit_weight=3.0)
    b, _ = target_loss(off, target, torch.tensor([True, True]))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="needs the reference"):
        target_loss(x, target, torch.tensor([True, True]), edit_weight=1.0)
