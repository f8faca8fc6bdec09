#!/usr/bin/env python3
"Write README.md from nbs/index.ipynb (Quarto, which nbdev-readme needs, is not installable here)."
import json, sys
from pathlib import Path
root = Path(sys.argv[1] if len(sys.argv) > 1 else '.')
nb = json.loads((root/'nbs'/'index.ipynb').read_text())
parts = ['<!-- Generated from nbs/index.ipynb; edit the notebook, not this file. -->']
for c in nb['cells']:
    src = ''.join(c['source']).rstrip()
    if not src: continue
    if c['cell_type'] == 'markdown': parts.append(src)
    elif not src.startswith('#|') and not src.lstrip().startswith('assert'): parts.append('```python\n' + src + '\n```')
(root/'README.md').write_text('\n\n'.join(parts) + '\n')
