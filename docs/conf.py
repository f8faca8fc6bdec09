# Sphinx configuration of the docs site. docs/build.py copies this file next to the generated source.
import re
from fastcore.docments import docments

project = 'influence_nb'
author = 'influence_nb developers'
root_doc = 'index'
extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.mathjax']
exclude_patterns = ['_build', '**.ipynb_checkpoints']
suppress_warnings = ['myst.header']          # notebooks may jump heading levels

# Notebooks: never executed here; the outputs stored in nbs/ are what a reader sees.
nb_execution_mode = 'off'
nb_output_stderr = 'remove'                  # warnings and progress bars are noise on a web page
nb_merge_streams = True
nb_ipywidgets_js = {}                        # widget views are stripped by build.py: no CDN require.js
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_update_mathjax = False

# API pages: autodoc on the installed package. Docstrings are nbdev's (Markdown-ish): `x` renders as code.
default_role = 'literal'
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_default_options = {'exclude-members': '__init__, __new__, __post_init__'}

_CODE = re.compile(r'(``?[^`]+``?)')

def md_line(line: str) -> str:
    "One line of an nbdev (Markdown) docstring made safe for reST: `|x|` and `name_` are literal text there."
    parts = _CODE.split(line)
    for i in range(0, len(parts), 2):         # outside code spans
        parts[i] = re.sub(r'(?<=\w)_(?=\W|$)', r'\\_', parts[i].replace('|', r'\|'))
    return ''.join(parts)

def add_docments(app, what, name, obj, options, lines):
    """Docstrings are nbdev's Markdown: make them safe for reST, and show docments (the comment after each
    parameter, nbdev's way of documenting arguments) as a parameter list."""
    tdoc = (getattr(type(obj), '__doc__', None) or '').strip().splitlines()
    if what in ('data', 'attribute') and lines and tdoc and lines[0].strip() == tdoc[0].strip():
        lines[:] = []                          # a constant: not the docstring of its type (dict, tuple, ...)
    lines[:] = [md_line(l) for l in lines]
    if what not in ('function', 'method', 'class'): return
    try: docs = docments(obj, full=True)
    except Exception: return               # builtins, C extensions, objects without source
    have = '\n'.join(lines)
    extra = [f':param {k}: {md_line(v["docment"])}' for k, v in docs.items()
             if k not in ('self', 'return') and v.get('docment') and f':param {k}:' not in have]
    ret = docs.get('return', {}).get('docment')
    if ret and ':returns:' not in have: extra.append(f':returns: {md_line(ret)}')
    if extra: lines.extend([''] + extra)

def add_constants(app, docname, source):
    """autodoc's `:members:` documents module-level data only when it has a doc comment: list every exported
    constant of an API page's module explicitly (value shown when short)."""
    if not docname.startswith('api/influence_nb'): return
    import importlib, inspect
    mod = importlib.import_module(docname.split('/', 1)[1])
    names = [n for n in getattr(mod, '__all__', []) if hasattr(mod, n)
             and not (inspect.isclass(getattr(mod, n)) or inspect.isroutine(getattr(mod, n)) or inspect.ismodule(getattr(mod, n)))]
    if not names: return
    blocks = [f'.. autodata:: {mod.__name__}.{n}' + ('\n   :no-value:' if len(repr(getattr(mod, n))) > 120 else '')
              for n in names]
    source[0] += '\n## Constants\n\n```{eval-rst}\n' + '\n\n'.join(blocks) + '\n```\n'

def setup(app):
    app.connect('autodoc-process-docstring', add_docments)
    app.connect('source-read', add_constants)

# Offline pages: MathJax 2 is served from _static (copied from the jupyter-server-mathjax wheel by build.py, with
# its STIX web fonts), so no CDN is asked for anything; the theme (furo) uses system fonts.
html_theme = 'furo'
html_title = 'influence_nb'
html_static_path = ['_static']
html_css_files = ['influence_nb.css']
html_copy_source = False
html_show_sourcelink = False
mathjax_path = 'mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full'   # the wheel's one combined config
mathjax2_config = {
    'tex2jax': {'inlineMath': [['\\(', '\\)']], 'displayMath': [['\\[', '\\]']], 'processEscapes': True,
                'ignoreClass': 'tex2jax_ignore|highlight|output'},
    'HTML-CSS': {'availableFonts': ['STIX-Web'], 'preferredFont': 'STIX-Web', 'webFont': 'STIX-Web', 'imageFont': None},
    'fast-preview': {'disabled': True},
    'showMathMenu': False,
    'messageStyle': 'none',
}
