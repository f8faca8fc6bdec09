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

def field_docments(cls) -> dict:
    """A dataclass's fields that carry a docment (the comment after the field), name -> text. autodoc lists every
    field as an attribute of its own (`:undoc-members:`), so the text goes there, not into a parameter list too."""
    import dataclasses
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)): return {}
    try: docs = docments(cls, full=True)
    except Exception: return {}
    return {f.name: docs[f.name]['docment'] for f in dataclasses.fields(cls)
            if f.name in docs and docs[f.name].get('docment')}

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
    fields = set(field_docments(obj)) if what == 'class' else set()   # documented on their own entries below
    extra = [f':param {k}: {md_line(v["docment"])}' for k, v in docs.items()
             if k not in ('self', 'return') and k not in fields and v.get('docment') and f':param {k}:' not in have]
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
    source[0] = source[0].replace('   :undoc-members:\n', f"   :undoc-members:\n   :exclude-members: {', '.join(names)}\n", 1)   # listed once, below
    source[0] += '\n## Constants\n\n```{eval-rst}\n' + '\n\n'.join(blocks) + '\n```\n'

def constant_comments(mod) -> dict:
    "An exported constant's comment on its first line (`NAME = value   # what it holds`), name -> text."
    import io, re, tokenize
    from pathlib import Path
    src = Path(mod.__file__).read_text(encoding='utf-8')
    comments = {t.start[0]: t.string.lstrip('#').strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    found = (re.match(r'([A-Z][A-Z0-9_]*)\s*(?::[^=]*)?=(?!=)', line) for line in src.splitlines())
    return {m.group(1): comments[i] for i, m in enumerate(found, 1)
            if m and m.group(1) in getattr(mod, '__all__', ()) and comments.get(i)}

def add_field_comments(app):
    """autodoc reads an attribute's doc from a `#:` comment before it (the analyzer's `attr_docs`). A dataclass field's
    docment, the comment after it, stands in for one, and so does an exported constant's comment on its line, so each
    field's and constant's entry says what it holds."""
    import importlib, pkgutil
    from sphinx.pycode import ModuleAnalyzer
    pkg = importlib.import_module('influence_nb')
    for m in pkgutil.walk_packages(pkg.__path__, 'influence_nb.'):
        if any(p.startswith('_') for p in m.name.split('.')[1:]): continue
        mod = importlib.import_module(m.name)
        classes = [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == m.name and field_docments(c)]
        consts = constant_comments(mod)
        if not (classes or consts): continue
        analyzer = ModuleAnalyzer.for_module(m.name); analyzer.analyze()
        for c in classes:
            for field, doc in field_docments(c).items(): analyzer.attr_docs.setdefault((c.__qualname__, field), [doc, ''])
        for name, doc in consts.items(): analyzer.attr_docs.setdefault(('', name), [doc, ''])

def setup(app):
    app.connect('builder-inited', add_field_comments)
    app.connect('autodoc-process-docstring', add_docments)
    app.connect('source-read', add_constants)

# Offline pages: MathJax 2 is served from _static (copied from the jupyter-server-mathjax wheel by build.py, with
# its STIX web fonts), so no CDN is asked for anything; the theme (furo) uses system fonts.
html_theme = 'furo'
html_title = 'influence_nb'
html_static_path = ['_static']
html_css_files = ['explorer.css', 'influence_nb.css']   # explorer.css: from influence_nb/assets, copied by build.py (PACKAGE_CSS)
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
