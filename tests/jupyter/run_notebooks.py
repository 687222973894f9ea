"""Runs every notebook in examples/ on the sdtune kernel with nbclient; each must finish without an error and
show at least one image/png. Executed copies go to target/notebooks/ (the examples stay as committed).

    python tests/jupyter/run_notebooks.py
"""

import glob
import os
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "*.ipynb")))
    assert paths, "no notebooks in examples/"
    out_dir = os.path.join(ROOT, "target", "notebooks")
    os.makedirs(out_dir, exist_ok=True)
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, kernel_name="sdtune", timeout=600,
                                resources={"metadata": {"path": os.path.dirname(path)}})
        client.execute()
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        errors = [o for o in outputs if o.output_type == "error"]
        assert not errors, f"{path}: {errors}"
        assert images, f"{path}: no image/png output"
        nbformat.write(nb, os.path.join(out_dir, os.path.basename(path)))
        print(f"{os.path.relpath(path, ROOT)}: {len(nb.cells)} cells, {len(images)} image/png outputs")


if __name__ == "__main__":
    sys.exit(main())
