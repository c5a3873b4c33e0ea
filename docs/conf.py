"""Sphinx configuration of the flask_serverside documentation."""

from importlib.metadata import version as _version

project = "flask_serverside"
copyright = "flask_serverside contributors"
release = _version("flask-serverside")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
]

# Sources are reStructuredText; myst_parser only reads the included
# CHANGES.md.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"

html_theme = "alabaster"
html_theme_options = {
    "description": "Server-side sessions for Flask",
    "fixed_sidebar": True,
}
html_title = f"flask_serverside {version}"
html_show_sourcelink = False
