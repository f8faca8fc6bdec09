#!/usr/bin/env python3
"Write README.md from nbs/index.ipynb (Quarto, which nbdev-readme needs, is not installable here)."
import base64, importlib.util, json, re, sys
from pathlib import Path
root = Path(sys.argv[1] if len(sys.argv) > 1 else '.')
_spec = importlib.util.spec_from_file_location('docs_build', Path(__file__).resolve().parent.parent/'docs'/'build.py')
docs_build = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs_build)   # its `is_check`: the home page's rule too
nb = json.loads((root/'nbs'/'index.ipynb').read_text())

def outputs(cell) -> list[str]:
    "The stored outputs of a code cell as README blocks: printed text and results as text, tables as HTML, figures as PNGs."
    out = []
    for i, o in enumerate(cell.get('outputs', [])):
        data = o.get('data', {})
        if 'image/png' in data:   # a figure: written next to the notebooks' other images and linked
            name = f"readme_{cell['id']}_{i}.png"
            (root/'nbs'/'images').mkdir(exist_ok=True)
            (root/'nbs'/'images'/name).write_bytes(base64.b64decode(''.join(data['image/png'])))
            out.append(f'![{name[:-4]}](nbs/images/{name})'); continue
        if o.get('output_type') == 'stream' and o.get('name') == 'stdout': text = ''.join(o['text'])
        elif '<table' in ''.join(data.get('text/html', '')):   # a DataFrame: GitHub renders the HTML table
            html = re.sub(r'<style[^>]*>.*?</style>', '', ''.join(data['text/html']), flags=re.S)
            out.append('\n'.join(l.strip() for l in html.splitlines() if l.strip())); continue   # one HTML block: no blank lines
        elif 'text/plain' in data: text = ''.join(data['text/plain'])
        else: continue
        if text.strip(): out.append('```text\n' + text.rstrip() + '\n```')
    return out

parts = ['<!-- Generated from nbs/index.ipynb; edit the notebook, not this file. -->']
for c in nb['cells']:
    src = ''.join(c['source']).rstrip()
    if not src: continue
    if c['cell_type'] == 'markdown': parts.append(src)
    elif not src.startswith('#|') and not docs_build.is_check(c):
        parts.append('```python\n' + src + '\n```')
        parts += outputs(c)
(root/'README.md').write_text('\n\n'.join(parts) + '\n')
