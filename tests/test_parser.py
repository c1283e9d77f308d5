"""SAMAParser: YAML config files merged in order, then command-line flags; clear errors for unknown options."""

import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from sama_trainer import SAMAConfig, SAMAParser


@dataclass
class Options:
    dataset_dir: str | None = None
    methods: list[str] = field(default_factory=lambda: ["finetune"])
    threshold: float = 0.5


def parse(argv):
    return SAMAParser((Options, SAMAConfig)).parse_args_and_config(argv)


def test_configs_merge_in_order_and_flags_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("dataset_dir: first\nthreshold: 0.1\nmax_steps: 7\nunroll_steps: 3\nmethods: [x, y]\n")
    b.write_text("threshold: 0.2\nmeta_gradient_kwargs: {bias_correction: false}\n")
    options, args = parse(["--config", str(a), "--config", str(b), "--max_steps", "9", "--output_dir", "o"])
    assert options.dataset_dir == "first"  # only in a
    assert options.threshold == 0.2  # b overrides a
    assert options.methods == ["x", "y"]
    assert args.max_steps == 9  # the flag overrides a
    assert args.unroll_steps == 3 and args.meta_gradient_kwargs == {"bias_correction": False}
    assert isinstance(args, SAMAConfig) and args.output_dir == "o"


def test_a_file_starts_from_the_files_it_names(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("dataset_dir: base\nthreshold: 0.1\nmax_steps: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("config: shared/base.yaml\nthreshold: 0.2\n")  # relative to child.yaml, not the cwd
    options, args = parse(["--config", str(child), "--max_steps", "9", "--output_dir", "o"])
    assert options.dataset_dir == "base" and options.threshold == 0.2 and args.max_steps == 9
    other = tmp_path / "other.yaml"
    other.write_text(f"config: [{child}]\ndataset_dir: other\n")  # a list, absolute path; two levels deep
    options, _ = parse(["--config", str(other), "--output_dir", "o"])
    assert options.dataset_dir == "other" and options.threshold == 0.2


def test_config_files_that_include_each_other_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\n")
    with pytest.raises(ValueError, match="loop"):
        parse(["--config", str(tmp_path / "a.yaml"), "--output_dir", "o"])


def test_without_config_it_is_a_plain_argument_parser():
    options, args = parse(["--threshold", "0.3", "--output_dir", "o", "--meta_objective", "correct"])
    assert options.threshold == 0.3 and args.meta_objective == "correct"


def test_env_section_is_exported(tmp_path, monkeypatch):
    monkeypatch.delenv("SAMA_PARSER_TEST", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("env:\n  SAMA_PARSER_TEST: '1'\nthreshold: 0.4\n")
    options, _ = parse(["--config", str(config), "--output_dir", "o"])
    assert os.environ["SAMA_PARSER_TEST"] == "1" and options.threshold == 0.4


def test_unknown_options_are_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("not_an_option: 1\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown option\(s\) \['not_an_option'\]"):
        parse(["--config", str(config)])
    with pytest.raises(ValueError, match="--not_a_flag"):
        parse(["--not_a_flag", "1", "--output_dir", "o"])
    config.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse(["--config", str(config)])


def test_a_field_named_config_is_refused():
    @dataclass
    class Bad:
        config: str = "x"

    with pytest.raises(ValueError, match="field named 'config'"):
        SAMAParser(Bad)


def test_help_lists_config_and_sama_fields(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(
        "from sama_trainer import SAMAConfig, SAMAParser\nSAMAParser(SAMAConfig).parse_args_and_config()\n"
    )
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config FILE" in out.stdout and "--meta_learning_rate" in out.stdout
