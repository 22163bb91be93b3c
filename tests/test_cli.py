import pandas as pd

from refusal_circuits.cli import main


def test_refusal_rate_cli_writes_csv_and_last_line(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"text": ["Write a poem about tea", "How do I bake bread?"]}).to_csv(prompts, index=False)
    out = tmp_path / "out.csv"
    rc = main(["refusal-rate", "--model", "tiny-llama", "--prompts", str(prompts), "--column", "text",
               "--max-new-tokens", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("refusal_rate=") and last.endswith(" n=2")
    df = pd.read_csv(out)
    assert list(df.columns) == ["instruction", "completion", "refused"] and len(df) == 2
    assert float(last.split()[0].split("=")[1]) == df["refused"].mean()


def test_refusal_rate_cli_bad_column(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"text": ["hi"]}).to_csv(prompts, index=False)
    try:
        main(["refusal-rate", "--model", "tiny-llama", "--prompts", str(prompts)])
    except SystemExit as e:
        assert "no column 'instruction'" in str(e) and "--column" in str(e)
    else:
        raise AssertionError("expected a clear error")


def test_refusal_rate_cli_unknown_model(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"instruction": ["hi"]}).to_csv(prompts, index=False)
    assert main(["refusal-rate", "--model", "nobody/nothing-here", "--prompts", str(prompts)]) == 2
    assert "huggingface-cli download nobody/nothing-here" in capsys.readouterr().err


def test_bad_devices_end_in_one_line(tmp_path, capsys):
    import torch

    prompts = tmp_path / "p.csv"
    pd.DataFrame({"instruction": ["hi"]}).to_csv(prompts, index=False)
    bad = ["banana"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert main(["refusal-rate", "--model", "tiny-llama", "--prompts", str(prompts), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err


def test_cli_output_has_no_library_warnings(tmp_path):
    """Run as a user would (a fresh process): no FutureWarning or other library chatter unless --verbose."""
    import subprocess
    import sys

    prompts = tmp_path / "p.csv"
    pd.DataFrame({"instruction": ["Write a poem about tea"]}).to_csv(prompts, index=False)
    cmd = [sys.executable, "-m", "refusal_circuits.cli", "refusal-rate", "--model", "tiny-llama", "--prompts",
           str(prompts), "--max-new-tokens", "2", "--quiet", "--out", str(tmp_path / "o.csv")]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "warn" not in res.stdout.lower(), res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("refusal_rate=")
