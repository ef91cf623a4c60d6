"""Tests that pin spec/shapes-world.md: palette, rasterisation, captions, instructions, parsing, scoring."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from npedit.shapes import (
    BACKGROUNDS,
    CATEGORIES,
    CELLS,
    COLOURS,
    TEMPLATES,
    Edit,
    Obj,
    Scene,
    apply_edit,
    caption,
    case_from_edit,
    case_to_dict,
    clean_fraction,
    edit_between,
    held_out_cases,
    instruction,
    make_case,
    parse,
    random_scene,
    read_cases_jsonl,
    referring_expression,
    render,
    sample_case,
    sample_edit,
    scene_from_dict,
    scene_to_dict,
    score_edit,
    shape_mask,
    summarize,
    write_cases_jsonl,
)

SPEC_BACKGROUNDS = {
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128),
    "sky": (140, 190, 235), "sand": (220, 200, 150),
}
SPEC_COLOURS = {
    "red": (215, 45, 45), "green": (45, 165, 65), "blue": (45, 85, 215),
    "yellow": (235, 205, 40), "purple": (145, 65, 185), "orange": (240, 135, 35),
}
SPEC_CENTRES = {
    "top left": (11, 11), "top": (32, 11), "top right": (53, 11),
    "left": (11, 32), "center": (32, 32), "right": (53, 32),
    "bottom left": (11, 53), "bottom": (32, 53), "bottom right": (53, 53),
}  # (cx, cy)


def spec_pixels(shape, r, cx, cy):
    """The set of (x, y) an object covers, straight from the spec's inequalities."""
    inside = {
        "circle": lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r**2,
        "square": lambda x, y: abs(x - cx) <= r - 1 and abs(y - cy) <= r - 1,
        "triangle": lambda x, y: cy - r <= y <= cy + r and 2 * abs(x - cx) <= y - (cy - r),
    }[shape]
    return {(x, y) for x in range(64) for y in range(64) if inside(x, y)}


def one(shape="circle", colour="red", size="small", cell="center", background="gray"):
    """A one-object scene."""
    return Scene(background, (Obj(shape, colour, size, cell),))


def test_palette_matches_spec():
    assert BACKGROUNDS == SPEC_BACKGROUNDS and COLOURS == SPEC_COLOURS
    assert list(CELLS) == list(SPEC_CENTRES)


def test_render_pixel_colours():
    image = render(one("circle", "red", "small", "top left", "gray"))
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert tuple(image[11, 11]) == (215, 45, 45)  # circle centre, row 11 column 11
    assert tuple(image[0, 0]) == (128, 128, 128) and tuple(image[63, 63]) == (128, 128, 128)
    right = render(one("square", "blue", "large", "right", "sky"))
    assert tuple(right[32, 53]) == (45, 85, 215) and tuple(right[32, 32]) == (140, 190, 235)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size,r", [("small", 5), ("large", 9)])
@pytest.mark.parametrize("cell", list(SPEC_CENTRES))
def test_rasterisation_matches_inequalities(shape, size, r, cell):
    image = render(one(shape, "green", size, cell, "white"))
    covered = np.all(image == SPEC_COLOURS["green"], axis=-1)  # (64, 64) indexed [y, x]
    ys, xs = np.nonzero(covered)
    assert set(zip(xs.tolist(), ys.tolist())) == spec_pixels(shape, r, *SPEC_CENTRES[cell])
    assert np.all(image[~covered] == SPEC_BACKGROUNDS["white"])


def test_rasterisation_pixel_counts():
    counts = {(s, r): len(spec_pixels(s, r, 32, 32)) for s in ("circle", "square", "triangle") for r in (5, 9)}
    assert counts == {("circle", 5): 81, ("circle", 9): 253, ("square", 5): 81, ("square", 9): 289,
                      ("triangle", 5): 61, ("triangle", 9): 181}
    for (shape, r), n in counts.items():
        size = "small" if r == 5 else "large"
        assert np.all(render(one(shape, "blue", size)) == SPEC_COLOURS["blue"], axis=-1).sum() == n


def test_scene_validation_and_canonical_order():
    a, b = Obj("circle", "red", "small", "bottom"), Obj("square", "blue", "large", "top left")
    assert Scene("gray", (a, b)) == Scene("gray", (b, a))
    assert Scene("gray", (a, b)).objects == (b, a)
    with pytest.raises(ValueError, match="1 to 3 objects, got 0"):
        Scene("gray", ())
    with pytest.raises(ValueError, match="1 to 3 objects, got 4"):
        Scene("gray", tuple(Obj("circle", "red", "small", c) for c in CELLS[:4]))
    with pytest.raises(ValueError, match=r"at most one object per cell, got cells \['bottom', 'bottom'\]"):
        Scene("gray", (a, Obj("square", "blue", "large", "bottom")))
    with pytest.raises(ValueError, match="allowed"):
        Obj("hexagon", "red", "small", "top")
    with pytest.raises(ValueError, match="allowed"):
        Scene("pink", (a,))


def test_caption_spec_example():
    scene = Scene("gray", (Obj("square", "blue", "small", "bottom"), Obj("circle", "red", "large", "top")))
    assert caption(scene) == "a red circle, a blue square on a gray background"


def test_spec_templates_are_taken_literally():
    # The spec writes `a {colour} {shape}` and `with a {colour} {shape}`: "a" even before "orange" (no "an").
    scene = Scene("sky", (Obj("triangle", "orange", "small", "center"), Obj("square", "red", "large", "bottom right")))
    assert caption(scene) == "a orange triangle, a red square on a sky background"
    assert instruction(scene, Edit("replace", "bottom right", "circle", "orange")) == \
        "replace the square with a orange circle"
    assert instruction(scene, Edit("recolor", "center", colour="blue")) == "make the triangle blue"
    assert instruction(scene, Edit("add", "top", "circle", "orange", "small")) == "add a small orange circle at the top"


def test_referring_expression_order():
    circle, square = Obj("circle", "red", "small", "top left"), Obj("square", "red", "small", "top")
    assert referring_expression(Scene("gray", (circle, square)), circle) == "the circle"
    blue = Obj("circle", "blue", "large", "center")
    assert referring_expression(Scene("gray", (circle, blue)), circle) == "the red circle"
    twin = Obj("circle", "red", "large", "bottom right")
    assert referring_expression(Scene("gray", (circle, twin)), circle) == "the circle at the top left"
    assert referring_expression(Scene("gray", (circle, twin)), twin) == "the circle at the bottom right"


def test_canonical_instruction_strings():
    red = Obj("circle", "red", "small", "top left")
    scene = Scene("gray", (red, Obj("square", "blue", "large", "center")))
    assert instruction(scene, Edit("add", "bottom", "triangle", "green", "large")) == \
        "add a large green triangle at the bottom"
    assert instruction(scene, Edit("remove", "top left")) == "remove the circle"
    assert instruction(scene, Edit("replace", "center", "triangle", "yellow")) == \
        "replace the square with a yellow triangle"
    assert instruction(scene, Edit("recolor", "top left", colour="purple")) == "make the circle purple"
    assert instruction(scene, Edit("resize", "top left", size="large")) == "make the circle larger"
    assert instruction(scene, Edit("resize", "center", size="small")) == "make the square smaller"
    assert instruction(scene, Edit("background", background="sand")) == "change the background to sand"
    twins = Scene("white", (red, Obj("circle", "red", "small", "right")))
    assert instruction(twins, Edit("remove", "right")) == "remove the circle at the right"


def test_apply_edit_effects():
    red = Obj("circle", "red", "small", "top left")
    scene = Scene("gray", (red, Obj("square", "blue", "large", "center")))
    assert apply_edit(scene, Edit("add", "bottom", "triangle", "green", "large")).at("bottom") == \
        Obj("triangle", "green", "large", "bottom")
    assert apply_edit(scene, Edit("remove", "top left")).at("top left") is None
    assert apply_edit(scene, Edit("replace", "center", "triangle", "yellow")).at("center") == \
        Obj("triangle", "yellow", "large", "center")
    assert apply_edit(scene, Edit("recolor", "top left", colour="blue")).at("top left") == \
        Obj("circle", "blue", "small", "top left")
    assert apply_edit(scene, Edit("resize", "top left", size="large")).at("top left").size == "large"
    assert apply_edit(scene, Edit("background", background="sky")).objects == scene.objects
    for bad, why in ((Edit("recolor", "top left", colour="red"), "colour unchanged"),
                     (Edit("resize", "center", size="large"), "size unchanged"),
                     (Edit("replace", "center", "square", "red"), "shape unchanged"),
                     (Edit("add", "center", "circle", "red", "small"), "the center is occupied"),
                     (Edit("remove", "bottom"), "no object at the bottom"),
                     (Edit("background", background="gray"), "the background is already gray")):
        with pytest.raises(ValueError, match=f"cannot apply .*: {why}$"):
            apply_edit(scene, bad)
    with pytest.raises(ValueError, match="cannot remove the only object"):
        apply_edit(Scene("gray", (red,)), Edit("remove", "top left"))
    with pytest.raises(ValueError, match="allowed|takes only|needs"):
        Edit("recolor", "top left", shape="square")


def test_case_keep_names_the_untouched_objects(tmp_path):
    from npedit.data import load_manifest

    scene = Scene("gray", (Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    keep = {category: case_from_edit(scene, edit).keep for category, edit in [
        ("recolor", Edit("recolor", "top left", colour="blue")), ("remove", Edit("remove", "top left")),
        ("resize", Edit("resize", "center", size="small")), ("background", Edit("background", background="sky")),
        ("add", Edit("add", "bottom", "triangle", "green", "large"))]}
    assert keep == {"recolor": ["blue square"], "remove": ["blue square"], "resize": ["red circle"],
                    "background": ["red circle", "blue square"], "add": ["red circle", "blue square"]}
    cases = held_out_cases(6, seed=0)  # written cases are a training manifest that carries them
    records = load_manifest(write_cases_jsonl(cases, tmp_path))
    assert [r.keep_names for r in records] == [c.keep for c in cases]


def test_case_new_and_gone_name_the_edits_own_result():
    red, blue = Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")
    scene = Scene("gray", (red, blue))
    cases = {category: case_from_edit(scene, edit) for category, edit in [
        ("recolor", Edit("recolor", "top left", colour="green")), ("remove", Edit("remove", "top left")),
        ("replace", Edit("replace", "center", shape="triangle", colour="red")),
        ("resize", Edit("resize", "center", size="small")), ("background", Edit("background", background="sky")),
        ("add", Edit("add", "bottom", "triangle", "green", "large"))]}
    assert {k: (c.new, c.gone) for k, c in cases.items()} == {
        "recolor": (["green circle"], ["red circle"]), "remove": ([], ["red circle"]),
        "replace": (["red triangle"], ["blue square"]), "resize": (["blue square"], []),
        "background": ([], []), "add": (["green triangle"], [])}
    # a name another object still carries is neither gone nor new: the keep check asks it
    twin = Scene("gray", (red, Obj("circle", "red", "large", "center")))
    case = case_from_edit(twin, Edit("recolor", "top left", colour="blue"))
    assert (case.new, case.gone, case.keep) == (["blue circle"], [], ["red circle"])
    case = case_from_edit(scene, Edit("replace", "top left", shape="square", colour="blue"))
    assert (case.new, case.gone) == ([], ["red circle"])  # the blue square exists already (kept)
    assert case_to_dict(case, "x.png")["new"] == [] and case_to_dict(case, "x.png")["gone"] == ["red circle"]


def test_preconditions_return_none():
    rng = np.random.default_rng(0)
    full = Scene("gray", tuple(Obj("circle", "red", "small", c) for c in ("top", "left", "right")))
    assert make_case(full, "add", rng) is None
    assert make_case(one(), "remove", rng) is None
    assert all(make_case(one(), c, rng) is not None for c in ("add", "replace", "recolor", "resize", "background"))


def test_sampled_edits_are_consistent():
    rng = np.random.default_rng(1)
    for _ in range(300):
        case = sample_case(rng, paraphrase_prob=0.5)
        edit = edit_between(case.reference, case.expected, case.category)
        assert apply_edit(case.reference, edit) == case.expected
        assert case.instruction in {instruction(case.reference, edit, t) for t in range(len(TEMPLATES[case.category]))}
        assert case.caption_reference == caption(case.reference)
        assert case.caption_target == caption(case.expected)
        assert case.edit_type == case.category
        if case.category == "replace":
            assert case.expected.at(edit.cell).shape != case.reference.at(edit.cell).shape
        if case.category == "remove":
            assert case.object_name == case.reference.at(edit.cell).name


def test_paraphrases_exist_and_differ():
    for category, templates in TEMPLATES.items():
        assert len(templates) >= 4 and len(set(templates)) == len(templates), category
    rng = np.random.default_rng(2)
    case = make_case(one(), "recolor", rng, paraphrase=True)
    assert case.instruction != instruction(one(), edit_between(case.reference, case.expected, "recolor"))


def test_sample_case_uniform_over_categories():
    rng = np.random.default_rng(3)
    counts = {c: 0 for c in CATEGORIES}
    for _ in range(1200):
        counts[sample_case(rng).category] += 1
    assert all(150 <= n <= 250 for n in counts.values()), counts


def test_parse_round_trip_random_scenes():
    rng = np.random.default_rng(4)
    for _ in range(500):
        scene = random_scene(rng)
        assert parse(render(scene)) == scene


def test_parse_round_trip_every_object():
    for cell in CELLS:
        for shape in ("circle", "square", "triangle"):
            for size in ("small", "large"):
                for colour in COLOURS:
                    for background in BACKGROUNDS:
                        scene = one(shape, colour, size, cell, background)
                        assert parse(render(scene)) == scene


def test_parse_robust_to_noise_and_jpeg():
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = random_scene(rng)
        image = render(scene)
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        assert parse(noisy) == scene
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90, subsampling=0)
        assert parse(np.asarray(Image.open(buffer).convert("RGB"))) == scene


def test_parse_ignores_stray_pixels():
    scene = one("triangle", "yellow", "large", "bottom left", "black")
    image = render(scene)
    image[5:8, 30] = SPEC_COLOURS["red"]  # a few stray object-coloured pixels in an empty cell
    assert parse(image) == scene


def test_parse_rejects_bad_input():
    with pytest.raises(ValueError, match="64"):
        parse(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        parse(np.zeros((64, 64, 3), np.float32))
    assert parse(np.full((64, 64, 3), 128, np.uint8)) is None  # no objects: not a valid scene


def test_clean_fraction():
    rng = np.random.default_rng(6)
    assert clean_fraction(render(random_scene(rng))) == 1.0
    assert clean_fraction(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) < 0.5
    edge = np.zeros((1, 2, 3), np.uint8) + np.array([128 + 40, 128, 128], np.uint8)  # exactly 40 from gray
    assert clean_fraction(edge) == 1.0


@pytest.mark.parametrize("category", CATEGORIES)
def test_score_edit_expected_and_unchanged(category):
    rng = np.random.default_rng(7)
    for k in range(20):
        case = sample_case(rng, category, id=f"c{k}")
        good = score_edit(render(case.expected), case)
        assert {m: good[m] for m in ("exact", "followed", "preserved", "clean")} == \
            {"exact": 1.0, "followed": 1.0, "preserved": 1.0, "clean": 1.0}
        lazy = score_edit(render(case.reference), case)
        assert (lazy["exact"], lazy["followed"], lazy["preserved"], lazy["clean"]) == (0.0, 0.0, 1.0, 1.0)


def test_score_edit_partial_and_unparseable():
    scene = Scene("gray", (Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    case = case_from_edit(scene, Edit("recolor", "top left", colour="green"))
    # Right colour but the shape changed too: followed, not preserved.
    wrong_shape = apply_edit(case.expected, Edit("replace", "top left", "triangle", "green"))
    scores = score_edit(render(wrong_shape), case)
    assert (scores["exact"], scores["followed"], scores["preserved"]) == (0.0, 1.0, 0.0)
    # Right edit but the background changed: followed, not preserved.
    scores = score_edit(render(apply_edit(case.expected, Edit("background", background="sand"))), case)
    assert (scores["exact"], scores["followed"], scores["preserved"]) == (0.0, 1.0, 0.0)
    for bad in (np.zeros((32, 32, 3), np.uint8), np.full((64, 64, 3), 128, np.uint8)):
        scores = score_edit(bad, case)
        assert (scores["exact"], scores["followed"], scores["preserved"]) == (0.0, 0.0, 0.0)


def test_error_kinds_name_each_mistake():
    from npedit.shapes.evaluate import errors_table
    from npedit.shapes.scoring import error_counts

    scene = Scene("gray", (Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    case = case_from_edit(scene, Edit("recolor", "top left", colour="green"))
    assert score_edit(render(case.expected), case)["errors"] == []
    assert score_edit(render(case.reference), case)["errors"] == ["edited cell: colour unchanged"]
    purple = apply_edit(case.expected, Edit("recolor", "top left", colour="purple"))
    assert score_edit(render(purple), case)["errors"] == ["edited cell: colour"]
    # The edit bled onto the other object, which also shrank and became a circle; the background moved.
    bled = Scene("sand", (Obj("circle", "green", "small", "top left"), Obj("circle", "green", "small", "center")))
    kinds = score_edit(render(bled), case)["errors"]
    assert kinds == ["background", "other cell: shape square->circle", "other cell: size large->small",
                     "other cell: colour of the edit"]
    extra = Scene("gray", (*case.expected.objects, Obj("triangle", "yellow", "small", "bottom")))
    assert score_edit(render(extra), case)["errors"] == ["other cell: extra object"]
    gone = Scene("gray", (Obj("square", "blue", "large", "center"),))
    assert score_edit(render(gone), case)["errors"] == ["edited cell: missing object"]
    assert score_edit(np.full((64, 64, 3), 128, np.uint8), case)["errors"] == ["unparseable"]
    rows = [score_edit(render(x), case) for x in (case.expected, case.reference, case.reference, gone)]
    assert error_counts(rows) == [("edited cell: colour unchanged", 2), ("edited cell: missing object", 1)]
    table = errors_table(rows)
    assert "| edited cell: colour unchanged | 2 | 0.500 |" in table and "missing object | 1 | 0.250 |" in table
    assert "every output is exact" in errors_table(rows[:1])


def test_exact_is_followed_and_preserved():
    rng = np.random.default_rng(8)
    for _ in range(200):
        case = sample_case(rng)
        near_miss = make_case(case.expected, CATEGORIES[rng.integers(len(CATEGORIES))], rng)
        output = case.expected if near_miss is None else near_miss.expected
        s = score_edit(render(output), case)
        assert s["exact"] == float(s["followed"] and s["preserved"])


def test_summarize():
    rows = [
        {"category": "add", "exact": 1.0, "followed": 1.0, "preserved": 1.0, "clean": 1.0},
        {"category": "add", "exact": 0.0, "followed": 1.0, "preserved": 0.0, "clean": 0.5},
        {"category": "remove", "exact": 0.0, "followed": 0.0, "preserved": 1.0, "clean": 1.0},
    ]
    summary = summarize(rows)
    assert list(summary) == ["add", "remove", "overall"]
    assert summary["add"] == {"exact": 0.5, "followed": 1.0, "preserved": 0.5, "clean": 0.75, "count": 2}
    assert summary["overall"]["count"] == 3 and summary["overall"]["exact"] == pytest.approx(1 / 3)


def test_metrics_split_by_the_number_of_objects_in_the_reference():
    from npedit.shapes.evaluate import objects_table
    from npedit.shapes.scoring import by_objects

    one = case_from_edit(Scene("gray", (Obj("circle", "red", "small", "top left"),)),
                         Edit("recolor", "top left", colour="green"))
    two = case_from_edit(Scene("gray", (Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large",
                                                                                        "center"))),
                         Edit("recolor", "top left", colour="green"))
    rows = [score_edit(render(one.expected), one), score_edit(render(two.expected), two),
            score_edit(render(two.reference), two)]
    assert [r["objects"] for r in rows] == [1, 2, 2]
    split = by_objects(rows)
    assert list(split) == ["recolor", "overall"]
    assert split["recolor"][1]["exact"] == 1.0 and split["recolor"][1]["count"] == 1
    assert split["recolor"][2]["exact"] == 0.5 and split["overall"][2]["count"] == 2
    table = objects_table(split)
    assert "| category | 1 object | 2 objects |" in table and "| recolor | 1.000 (1) | 0.500 (2) |" in table
    old = [{k: v for k, v in r.items() if k != "objects"} for r in rows]  # a report written before the split
    assert by_objects(old) == {} and objects_table(by_objects(old)) == ""


def test_referring_form_names_the_form_of_the_referring_expression():
    from npedit.shapes import REFERENCE_FORMS, referring_form

    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(300):
        scene = random_scene(rng)
        for obj in scene.objects:
            form, text = referring_form(scene, obj), referring_expression(scene, obj)
            seen.add(form)
            expected = {"shape": f"the {obj.shape}", "colour shape": f"the {obj.colour} {obj.shape}",
                        "shape cell": f"the {obj.shape} at the {obj.cell}"}[form]
            assert form in REFERENCE_FORMS and text == expected
    assert seen == set(REFERENCE_FORMS)
    twins = Scene("gray", (Obj("circle", "red", "small", "top left"), Obj("circle", "red", "large", "center")))
    assert referring_form(twins, twins.objects[1]) == "shape cell"


def test_metrics_split_by_how_the_instruction_names_the_object():
    from npedit.shapes.evaluate import form_table
    from npedit.shapes.scoring import by_form

    circle, square = Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")
    lone = case_from_edit(Scene("gray", (circle,)), Edit("recolor", "top left", colour="green"))
    by_shape = case_from_edit(Scene("gray", (circle, square)), Edit("recolor", "top left", colour="green"))
    by_colour = case_from_edit(Scene("gray", (circle, Obj("circle", "blue", "large", "center"))),
                               Edit("remove", "top left"))
    add = case_from_edit(Scene("gray", (circle,)), Edit("add", "bottom", shape="square", colour="red", size="small"))
    assert by_shape.instruction == "make the circle green" and by_colour.instruction == "remove the red circle"
    rows = [score_edit(render(lone.expected), lone), score_edit(render(by_shape.reference), by_shape),
            score_edit(render(by_shape.expected), by_shape), score_edit(render(by_colour.expected), by_colour),
            score_edit(render(add.expected), add)]
    assert [r["form"] for r in rows] == ["shape", "shape", "shape", "colour shape", ""]
    split = by_form(rows)
    assert list(split) == ["remove", "recolor", "overall"]  # object edits only, in the spec's order
    assert split["recolor"]["lone object"]["exact"] == 1.0
    assert split["recolor"]["the {shape}"] == {**split["recolor"]["the {shape}"], "exact": 0.5, "count": 2}
    assert split["overall"]["the {colour} {shape}"]["count"] == 1 and "the {shape} at the {cell}" not in split["overall"]
    table = form_table(split)
    assert "| category | lone object | `the {shape}` | `the {colour} {shape}` |" in table
    assert "| recolor | 1.000 (1) | 0.500 (2) |  |" in table
    assert by_form([{k: v for k, v in r.items() if k != "form"} for r in rows]) == {}  # reports from before


def test_held_out_cases_deterministic_and_balanced():
    a, b = held_out_cases(62, seed=3), held_out_cases(62, seed=3)
    assert a == b and len(a) == 62 and a != held_out_cases(62, seed=4)
    counts = [sum(c.category == cat for c in a) for cat in CATEGORIES]
    assert counts == [11, 11, 10, 10, 10, 10]
    assert len({c.id for c in a}) == 62
    for case in a:
        edit = edit_between(case.reference, case.expected, case.category)
        assert case.instruction == instruction(case.reference, edit)


def test_scene_dict_round_trip():
    rng = np.random.default_rng(9)
    for _ in range(50):
        scene = random_scene(rng)
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(scene)))) == scene


def test_write_cases_jsonl_round_trip(tmp_path):
    cases = held_out_cases(12, seed=0)
    path = write_cases_jsonl(cases, tmp_path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == [c.id for c in cases]
    keys = {"id", "image", "instruction", "category", "caption_reference", "caption_target",
            "edit_type", "object_name", "expected"}
    assert all(keys <= set(line) for line in lines)
    for line, case in zip(lines, cases):
        image = np.asarray(Image.open(tmp_path / line["image"]).convert("RGB"))
        assert np.array_equal(image, render(case.reference))
        assert scene_from_dict(line["expected"]) == case.expected
    assert read_cases_jsonl(tmp_path) == cases
    for line in lines:
        del line["reference"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_cases_jsonl(tmp_path) == cases  # reference recovered by parsing the png


def test_sample_edit_rejects_unknown_category():
    with pytest.raises(ValueError, match="allowed"):
        sample_edit(one(), "style", np.random.default_rng(0))


def test_training_cases_are_the_runs_own_cases_canonically_worded():
    from npedit.shapes.training import ShapesEditData, training_cases

    cases = training_cases(60, pool=1000, seed=2)
    data = ShapesEditData(1000, seed=2)
    assert [c.id for c in cases] == [f"train-{i:06d}" for i in range(60)]
    paraphrased = 0
    for i, c in enumerate(cases):
        trained = data.case(i)  # what the run sees at index i: the same scene and result
        assert (c.reference, c.expected, c.category) == (trained.reference, trained.expected, trained.category)
        paraphrased += c.instruction != trained.instruction
        assert c.instruction == instruction(c.reference, edit_between(c.reference, c.expected, c.category), 0)
    assert paraphrased > 0  # some were worded otherwise in training
    assert len(training_cases(50, pool=7)) == 7  # no more than the pool holds
    with pytest.raises(ValueError, match="n >= 1"):
        training_cases(0)


def test_parse_iou_threshold_is_inclusive():
    # the small square (81 px) plus 81 pixels of its cell that no large template covers: IoU exactly 0.5
    large = np.any([shape_mask(s, "large", "center") for s in ("circle", "square", "triangle")], axis=0)
    free = np.zeros((64, 64), bool)
    free[22:43, 22:43] = True  # the center cell: pixels nearer to 32 than to 11 or 53 on both axes
    ys, xs = np.nonzero(free & ~large)
    image = render(Scene("gray", (Obj("square", "red", "small", "center"),)))
    image[ys[:81], xs[:81]] = SPEC_COLOURS["red"]
    assert parse(image) == one("square", "red", "small", "center", "gray")
    image[ys[81], xs[81]] = SPEC_COLOURS["red"]  # one pixel more: IoU 81/163 < 0.5, no object, no scene
    assert parse(image) is None


def test_parse_background_and_dominant_colour():
    scene = Scene("sand", (Obj("circle", "blue", "large", "center"), Obj("circle", "blue", "small", "top")))
    image = render(scene)  # two objects of one colour: each cell's mask holds only its own
    assert parse(image) == scene
    image[0, :] = image[:, 0] = image[:, 63] = SPEC_COLOURS["red"]  # object colours on the border do not count
    image[63, :30] = SPEC_BACKGROUNDS["black"]  # border: 190 red, 34 sand, 30 black
    assert parse(image).background == "sand"
    image[63, :40] = SPEC_BACKGROUNDS["black"]  # 24 sand, 40 black
    assert parse(image).background == "black"
    mixed = render(scene)
    mixed[32, 23:26] = SPEC_COLOURS["green"]  # a minority colour in the cell: the dominant one is the object
    assert parse(mixed) == scene


def test_canonical_instructions_follow_the_spec_grammar():
    import re

    s, c, z, b = "circle|square|triangle", "|".join(SPEC_COLOURS), "small|large", "|".join(SPEC_BACKGROUNDS)
    cell = "|".join(sorted(SPEC_CENTRES, key=len, reverse=True))
    ref = rf"the (?:(?P<rc>{c}) )?(?P<rs>{s})(?: at the (?P<rcell>{cell}))?"
    grammar = {
        "add": rf"add a (?P<z>{z}) (?P<c>{c}) (?P<s>{s}) at the (?P<cell>{cell})", "remove": rf"remove {ref}",
        "replace": rf"replace {ref} with a (?P<c>{c}) (?P<s>{s})", "recolor": rf"make {ref} (?P<c>{c})",
        "resize": rf"make {ref} (?P<d>larger|smaller)", "background": rf"change the background to (?P<b>{b})",
    }
    for case in held_out_cases(300, seed=5):  # 12 of them name their object by shape and cell
        (category, m), = [(k, m) for k, g in grammar.items() if (m := re.fullmatch(g, case.instruction))]
        assert category == case.category
        objects = {o.cell: o for o in case.reference.objects}
        if category == "add":
            assert m["cell"] not in objects and len(objects) < 3
            assert case.expected.at(m["cell"]) == Obj(m["s"], m["c"], m["z"], m["cell"])
            continue
        if category == "background":
            assert m["b"] != case.reference.background
            assert case.expected == Scene(m["b"], case.reference.objects)
            continue
        named = [o for o in objects.values() if o.shape == m["rs"] and m["rc"] in (None, o.colour)
                 and m["rcell"] in (None, o.cell)]
        assert len(named) == 1, case.instruction  # the reference names one object ...
        target = named[0]  # ... by the shortest unique form, tried in the spec's order
        same_shape = [o for o in objects.values() if o.shape == target.shape]
        form = "shape" if len(same_shape) == 1 else (
            "colour" if sum(o.colour == target.colour for o in same_shape) == 1 else "cell")
        assert (m["rc"] is not None, m["rcell"] is not None) == {"shape": (False, False), "colour": (True, False),
                                                                 "cell": (False, True)}[form]
        others = tuple(o for o in objects.values() if o is not target)
        new = {"remove": lambda: None, "replace": lambda: Obj(m["s"], m["c"], target.size, target.cell),
               "recolor": lambda: Obj(target.shape, m["c"], target.size, target.cell),
               "resize": lambda: Obj(target.shape, target.colour, {"larger": "large", "smaller": "small"}[m["d"]],
                                     target.cell)}[category]()
        assert new != target and (category != "remove" or len(objects) >= 2)
        assert case.expected == Scene(case.reference.background, others + ((new,) if new else ()))
