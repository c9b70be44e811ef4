"""Sphinx configuration of pyrovae's documentation.

Build (offline, warnings are errors; the tutorials under ``tutorials/`` are executed)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import pyrovae  # noqa: E402

project = "pyrovae"
author = "pyrovae developers"
copyright = "pyrovae developers"
release = pyrovae.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# MathJax from the built site itself, so that equations render with the site opened offline: the docs extra
# installs sphinx-mathjax-offline (MathJax 3.2.2, Apache-2.0), which copies MathJax into _static/mathjax
# and points mathjax_path there. Without that package, MathJax loads from Sphinx's default CDN.
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    extensions.append("sphinx-mathjax-offline")

# Markdown pages (MyST) and notebooks (executed by myst-nb at every build).
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# API reference: autosummary writes one page per public name (docs/api/generated, not committed).
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# Offline: no intersphinx (other projects are linked by URL in the text).
nitpicky = False
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"pyrovae {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
templates_path = ["_templates"]
