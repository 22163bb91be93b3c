import pandas as pd

from refusal_circuits.cli import main


def test_refusal_rate_cli_writes_csv_and_last_line(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"text": ["Write a poem about tea", "How do I bake bread?"]}).to_csv(prompts, index=False)
    out = tmp_path / "out.csv"
    rc = main(["refusal-rate", "--model", "tiny-llama-2l", "--prompts", str(prompts), "--column", "text",
               "--max-new-tokens", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("refusal_rate=") and last.endswith(" n=2")
    df = pd.read_csv(out)
    assert list(df.columns) == ["instruction", "completion", "refused"] and len(df) == 2
    assert float(last.split()[0].split("=")[1]) == df["refused"].mean()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_refusal_rate_cli_bad_column(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"text": ["hi"]}).to_csv(prompts, index=False)
    assert main(["refusal-rate", "--model", "tiny-llama-2l", "--prompts", str(prompts)]) == 2
    line = _one_error_line(capsys)
    assert str(prompts) in line and "['instruction']" in line and "--column" in line


def test_every_bad_file_exits_2_with_one_line_naming_it(tmp_path, capsys):
    """A missing, non-UTF-8, empty or column-less file: the same status and one line, from every command."""
    missing = tmp_path / "nope.csv"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("sensitive,control\ncaf\xe9,th\xe9\n".encode("latin-1"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "manifest.json").write_text("{}")
    for bad, says in [(missing, "does not exist"), (latin, "not UTF-8 text (byte 0xe9"), (empty, "is empty")]:
        for argv in (["refusal-rate", "--prompts", str(bad), "--column", "sensitive"],
                     ["screen", "--pairs", str(bad), "--out", str(tmp_path / "o")],
                     ["cipher", "--pairs", str(bad), "--out", str(tmp_path / "screen")]):
            assert main(argv + ["--model", "tiny-llama-2l"]) == 2, argv
            line = _one_error_line(capsys)
            assert str(bad) in line and says in line, (argv, line)


def test_out_of_range_options_are_refused_by_the_parser(tmp_path, capsys):
    import pytest

    for argv in (["screen", "--pairs", "p.csv", "--out", "o", "--top-k", "0"],
                 ["cipher", "--pairs", "p.csv", "--out", "o", "--n-random", "-1"],
                 ["refusal-rate", "--prompts", "p.csv", "--max-new-tokens", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("refusal-circuits ")


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
        assert main(["refusal-rate", "--model", "tiny-llama-2l", "--prompts", str(prompts), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err


def test_cli_output_has_no_library_warnings(tmp_path):
    """Run as a user would (a fresh process): no FutureWarning or other library chatter unless --verbose."""
    import subprocess
    import sys

    prompts = tmp_path / "p.csv"
    pd.DataFrame({"instruction": ["Write a poem about tea"]}).to_csv(prompts, index=False)
    cmd = [sys.executable, "-m", "refusal_circuits.cli", "refusal-rate", "--model", "tiny-llama-2l", "--prompts",
           str(prompts), "--max-new-tokens", "2", "--quiet", "--out", str(tmp_path / "o.csv")]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "warn" not in res.stdout.lower(), res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("refusal_rate=")
