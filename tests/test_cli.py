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
