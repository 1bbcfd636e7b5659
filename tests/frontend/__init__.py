"""Front-end test machinery: a headless Chromium driven by Playwright, a real JupyterLab,
the notebooks that show gradmagic reports, and measurements of what a reader sees.

`tests/test_frontend.py` and `tests/test_browser.py` use it; so does
`python -m tests.frontend.screenshots OUTDIR`.
"""
