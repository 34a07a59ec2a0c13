"""The `heal` command's conventions and the edges a new user meets first.

* `heal bench` writes into ``./heal-bench-results/`` unless told otherwise (never into the committed
  ``benchmarks/results/``), spells the flag ``--output-dir`` everywhere (``--out-dir``: hidden alias that
  warns), and `heal bench entropy` prints no profiler noise;
* every ``--long-option`` also answers to its underscore spelling, unknown options and subcommands get a
  "did you mean", ``heal --version``, ``--config`` on every subcommand with option-style keys
  (``general-per-batch`` or ``general_per_batch``);
* `heal plot`: verl console logs as Ray prints them, the trainer's key names in the help, one colour per
  domain in every figure, no folder created for ``--output``, panels and units that do not collide.

Each CLI test runs ``heal.cli.main`` in a temporary folder and checks the message, the exit code and the
files left behind.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import heal.cli as cli
from heal.analysis import logs, plots

ROOT = Path(__file__).resolve().parents[2]
TINY_EDA = ["--batch", "8", "--min-len", "4", "--max-len", "16", "--iters", "1", "--ref-pairs", "2", "--device", "cpu"]


def _run(capfd, *argv):
    """``heal ARGV`` in this process: (exit code, stdout, stderr); stderr at the file-descriptor level, so
    what C++ libraries print there is seen too."""
    capfd.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        rc = exc.code
    out, err = capfd.readouterr()
    return rc, out, err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bench_names():
    from heal.cli.bench import BENCHMARKS

    return list(BENCHMARKS)


# ------------------------------------------------------------------ 1. heal bench: where results go


def test_bench_default_folder_leaves_the_committed_results_alone(tmp_path, monkeypatch, capfd):
    """Run from a repository root, `heal bench eda` writes ./heal-bench-results/, not benchmarks/results/."""
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    (committed / "eda-cpu.json").write_text('{"committed": true}\n')
    (committed / "eda-cpu.md").write_text("# the table the README quotes\n")
    before = _snapshot(committed)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capfd, "bench", "eda", *TINY_EDA)
    assert rc == 0, err
    assert _snapshot(committed) == before
    written = tmp_path / "heal-bench-results"
    assert sorted(os.listdir(written)) == ["eda-cpu.json", "eda-cpu.md", "eda-cpu.png"]
    assert "heal-bench-results" in out


def test_bench_output_dir_is_one_spelling_everywhere(capsys):
    """Every `heal bench NAME` takes --output-dir (default heal-bench-results); --out-dir still works,
    warns, and is not in the help."""
    parser = cli.build_parser()
    names = _bench_names()
    assert {"entropy", "linear", "eda", "reward", "sandbox", "static", "rollout"} <= set(names)
    for name in names:
        assert "D1" in vars(parser.parse_args(["bench", name, "--output-dir", "D1"])).values(), name
        assert "heal-bench-results" in [str(v) for v in vars(parser.parse_args(["bench", name])).values()], name
        capsys.readouterr()
        assert "D2" in vars(parser.parse_args(["bench", name, "--out-dir", "D2"])).values(), name
        err = capsys.readouterr().err
        assert "--out-dir is deprecated" in err and "--output-dir" in err, (name, err)
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", name, "--help"])
        help_text = capsys.readouterr().out
        assert "--output-dir" in help_text and "--out-dir" not in help_text, (name, help_text)
        assert "heal-bench-results" in help_text, name


def test_bench_scripts_still_write_the_committed_results(tmp_path):
    """benchmarks/<name>.py (what the README's numbers come from) pass --output-dir benchmarks/results:
    a copy of benchmarks/eda.py writes next to itself, whatever the current folder."""
    scripts = tmp_path / "repo" / "benchmarks"
    scripts.mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "eda.py", scripts / "eda.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(scripts / "eda.py"), *TINY_EDA], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(scripts / "results")) == ["eda-cpu.json", "eda-cpu.md", "eda-cpu.png"]
    assert os.listdir(elsewhere) == []
    for name in ("eda", "entropy", "linear", "reward_step", "rollout", "sandbox", "static"):
        assert "--output-dir" in (ROOT / "benchmarks" / f"{name}.py").read_text(), name
    gpu = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    bench_lines = [ln for ln in gpu.splitlines() if "heal bench" in ln and not ln.lstrip().startswith("#")]
    assert bench_lines and all('--output-dir "$out"' in ln for ln in bench_lines)
    assert "out=${1:-benchmarks/results}" in gpu


def test_bench_entropy_prints_no_profiler_noise(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capfd, "bench", "entropy", "--device", "cpu", "--rows", "64", "--vocab", "256", "--iters", "1",
                        "--no-compile", "--no-write")
    assert rc == 0, err
    assert "USDT" not in err and "profiler_start" not in err and "profiler_stop" not in err, err
    assert "torch / heal" in out
    assert os.listdir(tmp_path) == []  # --no-write


def test_profiler_filter_keeps_other_stderr_lines(capfd):
    """Only kineto's start/stop lines are dropped: what else goes to stderr meanwhile still arrives."""
    import torch

    from heal.bench import harness

    def fn():
        os.write(2, b"a line that must stay\n")
        return torch.ones(1000) * 2

    capfd.readouterr()
    peak = harness.peak_memory_bytes(fn, torch.device("cpu"))
    err = capfd.readouterr().err
    assert peak is None or peak >= 0
    assert "a line that must stay" in err and "USDT" not in err, err


# ------------------------------------------------------------------ 2. CLI conventions


def test_underscore_spelling_of_every_long_option():
    parser = cli.build_parser()
    args = parser.parse_args(["mix", "--general_per_batch", "3", "--target", "t.parquet", "--no_shuffle_within_batch"])
    assert args.general_per_batch == 3 and args.shuffle_within_batch is False
    args = parser.parse_args(["demo", "--max_new_tokens=7", "--top_k", "2", "--model_path", "m.gguf"])
    assert (args.max_new_tokens, args.top_k, args.model_path) == (7, 2, "m.gguf")
    args = parser.parse_args(["plot", "heatmap", "r.jsonl", "--max_per_step", "5", "--data_source", "math"])
    assert (args.max_per_step, args.data_source) == (5, "math")
    args = parser.parse_args(["bench", "eda", "--min_len", "3", "--output_dir", "D"])
    assert args.min_len == 3 and "D" in vars(args).values()
    args = parser.parse_args(["select", "--max_new_tokens", "9", "--gpu_memory_utilization", "0.5"])
    assert (args.max_new_tokens, args.gpu_memory_utilization) == (9, 0.5)


def test_underscore_option_runs_end_to_end(tmp_path, capfd):
    from heal.data.io import write_parquet_rows
    from heal.data.synthetic import arithmetic_rows, choice_rows

    write_parquet_rows(arithmetic_rows(4), tmp_path / "t.parquet")
    write_parquet_rows(choice_rows(8), tmp_path / "g.parquet")
    rc, out, err = _run(capfd, "mix", "--target", tmp_path / "t.parquet", "--general", tmp_path / "g.parquet",
                        "--k", "2", "--general_per_batch", "2", "--steps", "2", "--output", tmp_path / "m.parquet")
    assert rc == 0, err
    assert json.loads(out.splitlines()[0])["batch_size"] == 4


@pytest.mark.parametrize("argv, wrong, right", [
    (["mix", "--general-per-bach", "3"], "--general-per-bach", "--general-per-batch"),
    (["demo", "--max-new-tokns", "3"], "--max-new-tokns", "--max-new-tokens"),
    (["bench", "eda", "--ouput-dir", "x"], "--ouput-dir", "--output-dir"),
    (["plot", "curves", "m.jsonl", "--smoth", "2"], "--smoth", "--smooth"),
])
def test_unknown_option_did_you_mean(tmp_path, monkeypatch, capfd, argv, wrong, right):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capfd, *argv)
    assert rc == 2
    assert wrong in err and f"did you mean {right}?" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, wrong, right", [
    (["slect"], "slect", "select"),
    (["bench", "entrpy"], "entrpy", "entropy"),
    (["plot", "curvs", "m.jsonl"], "curvs", "curves"),
])
def test_unknown_subcommand_did_you_mean(tmp_path, monkeypatch, capfd, argv, wrong, right):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capfd, *argv)
    assert rc == 2
    assert f"invalid choice: '{wrong}'" in err and f"did you mean '{right}'?" in err, err
    assert os.listdir(tmp_path) == []


def test_version(capfd):
    rc, out, err = _run(capfd, "--version")
    assert rc == 0
    assert out.strip() == f"heal {importlib.metadata.version('heal')}"


def test_config_option_on_every_subcommand(capfd):
    leaves = [["demo"], ["prepare"], ["mix"], ["select"], ["env"], ["plot", "curves"], ["plot", "heatmap"],
              ["plot", "dynamics"]] + [["bench", name] for name in _bench_names()]
    for leaf in leaves:
        rc, out, err = _run(capfd, *leaf, "--help")
        assert rc == 0 and "--config" in out, leaf


def _metrics_log(path: Path) -> Path:
    path.write_text("".join(json.dumps({"step": s, "eda/entropy_mean_target": 0.5 - s / 100,
                                        "eda/entropy_mean_general": 0.6}) + "\n" for s in range(6)))
    return path


def test_config_file_sets_options_and_the_command_line_wins(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    log = _metrics_log(tmp_path / "m.jsonl")
    cfg = tmp_path / "plot.yaml"
    cfg.write_text("output: from-config.png\nsmooth: 2\ntitle: from the config\n")
    rc, out, err = _run(capfd, "plot", "curves", log, "--config", cfg)
    assert rc == 0, err
    assert (tmp_path / "from-config.png").is_file()
    rc, out, err = _run(capfd, "plot", "curves", log, "--config", cfg, "--output", "from-cli.png")
    assert rc == 0, err
    assert (tmp_path / "from-cli.png").is_file()
    # a flag (store_true) from the file, key spelled like the option
    env_cfg = tmp_path / "env.yaml"
    env_cfg.write_text("json: true\n")
    rc, out, err = _run(capfd, "env", "--config", env_cfg)
    assert rc == 0, err
    assert "python" in json.loads(out)


def test_config_keys_may_use_hyphens(tmp_path, monkeypatch, capfd):
    """Keys are the long option names: `general-per-batch` and `general_per_batch` both work, for the
    subcommands with a config schema (mix) and the others (bench)."""
    from heal.data.io import write_parquet_rows
    from heal.data.synthetic import arithmetic_rows, choice_rows

    write_parquet_rows(arithmetic_rows(4), tmp_path / "t.parquet")
    write_parquet_rows(choice_rows(8), tmp_path / "g.parquet")
    for n, key in enumerate(("general-per-batch", "general_per_batch")):
        cfg = tmp_path / f"mix{n}.yaml"
        out_file = tmp_path / f"mix{n}.parquet"
        cfg.write_text(f"target: [{tmp_path / 't.parquet'}]\ngeneral: [{tmp_path / 'g.parquet'}]\nk: 2\n"
                       f"{key}: 2\nsteps: 2\noutput: {out_file}\n")
        rc, out, err = _run(capfd, "mix", "--config", cfg)
        assert rc == 0, err
        assert json.loads(out.splitlines()[0])["batch_size"] == 4 and out_file.is_file()
    both = tmp_path / "both.yaml"
    both.write_text("general-per-batch: 2\ngeneral_per_batch: 3\n")
    rc, out, err = _run(capfd, "mix", "--config", both)
    assert rc == 2 and "general-per-batch" in err and "general_per_batch" in err, err

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("batch: 8\nmin-len: 4\nmax_len: 16\niters: 1\nref-pairs: 2\ndevice: cpu\noutput-dir: from-config\n")
    rc, out, err = _run(capfd, "bench", "eda", "--config", cfg, "--output-dir", "from-cli")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "from-cli")) == ["eda-cpu.json", "eda-cpu.md", "eda-cpu.png"]
    assert not (tmp_path / "from-config").exists()
    doc = json.loads((tmp_path / "from-cli" / "eda-cpu.json").read_text())
    assert doc["shape"]["batch"] == 8 and doc["shape"]["max_len"] == 16


def test_config_errors_name_the_key(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    log = _metrics_log(tmp_path / "m.jsonl")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("smoth: 2\noutput: never.png\n")
    rc, out, err = _run(capfd, "plot", "curves", log, "--config", cfg)
    assert rc == 2 and "smoth" in err and "did you mean 'smooth'?" in err, err
    cfg.write_text("smooth: two\noutput: never.png\n")
    rc, out, err = _run(capfd, "plot", "curves", log, "--config", cfg)
    assert rc == 2 and "smooth" in err and "two" in err, err
    cfg.write_text("metric: kll\n")
    rc, out, err = _run(capfd, "plot", "heatmap", log, "--config", cfg)
    assert rc == 2 and "metric" in err and "did you mean 'kl'?" in err, err
    rc, out, err = _run(capfd, "env", "--config", tmp_path / "missing.yaml")
    assert rc == 2 and "missing.yaml" in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "m.jsonl"]


# ------------------------------------------------------------------ 3. heal plot edges


def test_plot_curves_reads_a_verl_console_log_as_ray_prints_it(tmp_path, capfd):
    log = tmp_path / "verl_console.log"
    log.write_text(
        "\x1b[36m(TaskRunner pid=2840637)\x1b[0m Using dataset class: RLHFDataset\n"
        "\x1b[36m(TaskRunner pid=2840637)\x1b[0m step:1 - actor/entropy:0.612 - eda/entropy_mean_target:0.41 - "
        "eda/entropy_mean_general:0.55\n"
        "(TaskRunner pid=2840637) step:2 - actor/entropy:0.598 - eda/entropy_mean_target:0.39 - "
        "eda/entropy_mean_general:0.54\n"
        "\x1b[36m(WorkerDict pid=2841210, ip=10.0.0.2)\x1b[0m kernel warm-up done\n"
        "\x1b[36m(TaskRunner pid=2840637)\x1b[0m step:3 - actor/entropy:0.590 - eda/entropy_mean_target:0.37 - "
        "eda/entropy_mean_general:0.53 [repeated 2x across cluster]\n")
    metrics = logs.load_metrics(str(log))
    assert sorted(metrics) == [1, 2, 3]
    assert metrics[3] == {"actor/entropy": 0.590, "eda/entropy_mean_target": 0.37, "eda/entropy_mean_general": 0.53}
    rc, out, err = _run(capfd, "plot", "curves", log, "--output", tmp_path / "c.png")
    assert rc == 0, err
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_help_names_the_keys_the_trainer_logs(capfd):
    rc, out, err = _run(capfd, "plot", "--help")
    assert rc == 0
    assert "eda/entropy_mean_target" in out
    assert not re.search(r"eda/entropy_target\b", out), out
    rc, out, err = _run(capfd, "plot", "curves", "--help")
    assert "eda/entropy_mean_<domain>" in out, out


def _capture_figures(monkeypatch):
    """The figures heal.analysis.plots saves, each as (figure, renderer) drawn as saved."""
    figs = []
    real_save = plots._save

    def save(fig, path):
        fig.canvas.draw()
        figs.append((fig, fig.canvas.get_renderer()))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return figs


def _line_colours(fig):
    import matplotlib.colors as mcolors

    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_") and label != "mean":
                out[label.split(" ")[0]] = mcolors.to_hex(line.get_color())
    return out


def test_one_colour_per_domain_in_every_plot(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    metrics = {s: {"eda/entropy_mean_target": 0.4, "eda/entropy_mean_general": 0.6} for s in range(4)}
    plots.plot_entropy_curves(metrics, str(tmp_path / "c.png"))
    ents = [[0.1, 0.5, 0.2], [0.3, 0.2], [0.9, 0.4, 0.6], [0.2, 0.2, 0.1]]
    # the demo's labels, in the demo's order (target first) and the other way round
    plots.plot_entropy_dynamics(ents, ["target (heal_demo_math)"] * 2 + ["general (commonsense_qa)"] * 2,
                                str(tmp_path / "d1.png"))
    plots.plot_entropy_dynamics(ents, ["general (commonsense_qa)"] * 2 + ["target (heal_demo_math)"] * 2,
                                str(tmp_path / "d2.png"))
    curves, dyn1, dyn2 = (_line_colours(f) for f, _ in figs)
    assert set(curves) == {"target", "general"}
    assert curves["target"] != curves["general"]
    assert dyn1["target"] == dyn2["target"] == curves["target"], (curves, dyn1, dyn2)
    assert dyn1["general"] == dyn2["general"] == curves["general"], (curves, dyn1, dyn2)
    # any other domain name keeps its colour whatever else is in the figure
    assert plots.domain_color("medqa", ["medqa", "commonsense_qa"]) == plots.domain_color("medqa", ["medqa"])
    assert plots.domain_color("commonsense_qa", ["medqa"]) == plots.domain_color("commonsense_qa", ["deepscaler"])
    # two names that hash alike still get two colours in one figure
    pair = plots.domain_colors(["commonsense_qa", "synthetic_choice"])
    assert len(set(pair.values())) == 2
    assert plots.TARGET_COLOR not in pair.values() and plots.GENERAL_COLOR not in pair.values()


@pytest.mark.parametrize("kind", ["curves", "heatmap", "dynamics"])
def test_plot_output_in_a_missing_folder_is_an_error(tmp_path, capfd, kind):
    src = tmp_path / "in.jsonl"
    if kind == "curves":
        _metrics_log(src)
    else:
        logs.write_rollout_dump(str(src), [{"step": 0, "data_source": d, "entropy": [0.1, 0.4, 0.2]}
                                           for d in ("math", "math", "csqa")])
    missing = tmp_path / "nonexistent" / "dir"
    rc, out, err = _run(capfd, "plot", kind, src, "--output", missing / "x.png")
    assert rc == 2
    assert f"output folder does not exist: {missing}" in err, err
    assert not (tmp_path / "nonexistent").exists()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_heatmap_panels_do_not_overlap(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    recs = [{"step": st, "data_source": d, "entropy": [0.1 * ((i * 7 + k) % 5) for i in range(6 + k)]}
            for st in (0, 10, 20, 30) for k, d in enumerate(["commonsense_qa"] * 4 + ["medmcqa_four_options"] * 4)]
    plots.plot_distance_heatmaps_by_step(recs, str(tmp_path / "h.png"))
    fig, renderer = figs[0]
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # the panels (with their tick labels), the colour bar
    assert len(boxes) == 5
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _boxes_overlap(boxes[i], boxes[j]), (i, j, boxes[i], boxes[j])


def test_selection_figure_keeps_units_apart(tmp_path, monkeypatch):
    from heal.selection import question_stats, select_top_k

    figs = _capture_figures(monkeypatch)
    stats = [question_stats(f"q{i}", i, [1.0, 0.0, float(i % 2)], [[0.2 * i, 1.5, 0.1], [2.5, 0.3], [0.4, 0.9]])
             for i in range(8)]
    plots.plot_selection(stats, select_top_k(stats, 3), str(tmp_path / "s.png"))
    fig, renderer = figs[0]
    by_label = {}
    for ax in fig.axes:
        for t in ax.get_xticklabels():
            by_label.setdefault(t.get_text(), set()).add(ax)
    acc_ax, = by_label["Acc"]
    div_ax, = by_label["Diversity"]
    assert acc_ax is not div_ax  # 0-1 fractions and nats on separate axes
    assert by_label["Uncertainty"] == {acc_ax}
    assert "nats" in div_ax.get_ylabel() and "nats" not in acc_ax.get_ylabel()
    assert acc_ax.get_ylim()[1] <= 1.1
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _boxes_overlap(boxes[i], boxes[j]), (i, j)
