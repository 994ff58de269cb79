"""Sphinx configuration of the API reference and tutorials site.

Build (from the repository root; CI runs the same line with ``-W --keep-going``):

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html -d build/docs/doctrees tutorials build/docs/html

The source is this folder: ``index.rst``, the API pages in ``api/`` and the tutorial
notebooks, rendered by myst-nb without executing them (the test command executes them).
The build needs no network: no intersphinx inventories are fetched.
"""

from __future__ import annotations

import pyro_flows

project = "pyro_flows"
author = "the pyro_flows authors"
copyright = "the pyro_flows authors, Apache-2.0"
version = release = pyro_flows.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path: list[str] = []

# -- API pages from the docstrings (Google style, numpy-style References sections) --
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"  # signatures stay readable; types go next to the arguments
autodoc_typehints_description_target = "documented"
autodoc_class_signature = "separated"  # __init__'s arguments, not nn.Module's *args, **kwargs
autodoc_inherit_docstrings = False  # do not repeat torch/Pyro docstrings on overridden methods
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
add_module_names = False
python_display_short_literal_types = True

# -- tutorials: notebooks are shown, not run (CI runs them with nbmake) --
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- HTML --
html_theme = "furo"
html_title = f"pyro_flows {release}"
html_static_path: list[str] = []

# Modules without an API page, and why. Any other module of the package that no page in api/
# documents is a build warning (an error in CI), so a new module cannot be left out silently.
UNDOCUMENTED = {
    "pyro_flows.cli": "the command line; documented by `pyro-flows --help` and the README",
    "pyro_flows.demo": "the science of `pyro-flows demo`, not a library API",
    "pyro_flows.utils": "internal helpers",
}


def _check_every_module_has_a_page(app) -> None:
    import pkgutil
    import re
    from pathlib import Path

    from sphinx.util import logging

    pages = sorted(Path(app.srcdir, "api").glob("*.rst"))
    documented = {m for page in pages for m in re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), re.M)}
    modules = {info.name for info in pkgutil.walk_packages(pyro_flows.__path__, "pyro_flows.")}
    for name in sorted(modules - documented - set(UNDOCUMENTED)):
        if not any(part.startswith("_") for part in name.split(".")):
            logging.getLogger(__name__).warning("module %s has no API page (add it to tutorials/api/)", name)
    for name in sorted(set(UNDOCUMENTED) - modules):
        logging.getLogger(__name__).warning("UNDOCUMENTED in tutorials/conf.py names a missing module: %s", name)


def setup(app) -> None:
    app.connect("builder-inited", _check_every_module_has_a_page)
