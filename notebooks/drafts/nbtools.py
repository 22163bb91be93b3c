"""Build a notebook from (kind, source) cells: used by the drafts in this folder."""
import nbformat


def build(path, cells):
    nb = nbformat.v4.new_notebook()
    out = []
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            out.append(nbformat.v4.new_markdown_cell(src))
        else:
            c = nbformat.v4.new_code_cell(src)
            if kind == "params":
                c.metadata["tags"] = ["parameters"]
            out.append(c)
    nb.cells = out
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (refusal-circuits)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)


SETUP = '''%load_ext autoreload
%autoreload 2
import warnings; warnings.filterwarnings("ignore")
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
torch.manual_seed(SEED)
torch.set_num_threads(max(1, torch.get_num_threads()))
pd.set_option("display.max_colwidth", 90)
model = rc.load_model(MODEL, device=DEVICE, dtype=DTYPE)
store = rc.ResultsStore.for_model(model)
print(f"{model.name}: {model.n_layers} layers, {model.n_heads} heads, d_model {model.d_model}; "
      f"refusal tokens {[model.tokenizer.decode([t]) for t in model.refusal_token_ids]}")'''
