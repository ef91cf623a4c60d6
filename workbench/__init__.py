"""The NP-Edit workbench: what the app needs on top of `npedit` (loading, inspection, jobs, runs, plots).

Dependencies point one way: app.py -> workbench -> npedit.
"""
