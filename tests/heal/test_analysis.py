"""heal.analysis: log formats, distance matrix, figures, and the heal plot command."""

import json
import os

import numpy as np
import pytest
import torch

from heal.analysis import logs, plots
from heal_kernels import reference


def _is_png(path, min_size=5_000):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) >= min_size


# ------------------------------------------------------------------ metrics logs


def test_load_metrics_three_formats_merged(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join([
        json.dumps({"step": 2, "eda/entropy_target": 0.4, "eda/entropy_general": 0.6, "note": "text"}),
        json.dumps({"step": 1, "data": {"actor/entropy": 0.9, "eda/entropy_target": 0.5}}),
        "step:2 - actor/entropy:0.8 - timing/gen:1.5e+00 - weird",
        "some unrelated console line",
        "",
        json.dumps({"step": 3, "eda/entropy_target": float("nan"), "eda/entropy_general": 0.7}),
    ]) + "\n")
    m = logs.load_metrics(str(p))
    assert list(m) == [1, 2, 3]
    assert m[1] == {"actor/entropy": 0.9, "eda/entropy_target": 0.5}
    assert m[2] == {"eda/entropy_target": 0.4, "eda/entropy_general": 0.6, "actor/entropy": 0.8, "timing/gen": 1.5}
    assert m[3] == {"eda/entropy_general": 0.7}  # NaN dropped


def test_load_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        logs.load_metrics(str(tmp_path / "none.jsonl"))
    p = tmp_path / "bad.jsonl"
    p.write_text('{"eda/entropy_target": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record has no 'step'"):
        logs.load_metrics(str(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        logs.load_metrics(str(p))
    p.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no metrics"):
        logs.load_metrics(str(p))


def test_parse_console_line():
    assert logs.parse_console_line("step:7 - a/b:1 - c:-2.5") == {"step": 7, "a/b": 1.0, "c": -2.5}
    assert logs.parse_console_line("epoch 3") is None


def test_rollout_dump_roundtrip_and_errors(tmp_path):
    p = str(tmp_path / "r.jsonl")
    recs = [{"data_source": "math", "entropy": [0.5, 1.25], "uid": "a"}, {"step": 4, "data_source": "csqa", "entropy": []}]
    logs.write_rollout_dump(p, recs)
    back = logs.load_rollout_dump(p)
    assert back[0] == {"data_source": "math", "entropy": [0.5, 1.25], "uid": "a", "step": 0}
    assert back[1]["step"] == 4 and back[1]["entropy"] == []
    with pytest.raises(ValueError, match="entropy"):
        logs.write_rollout_dump(p, [{"data_source": "x"}])
    (tmp_path / "bad.jsonl").write_text('{"entropy": [1]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record has no 'data_source'"):
        logs.load_rollout_dump(str(tmp_path / "bad.jsonl"))


def test_append_rollout_dump_per_step(tmp_path):
    p = str(tmp_path / "sub" / "dir" / "r.jsonl")  # parent dirs are created
    ents = [torch.tensor([0.1234567, 2.0]), np.array([], dtype=np.float32), [1.0, 0.5, 0.25]]
    n = logs.append_rollout_dump(p, 3, ents, ["math", "csqa", "math"], uid=["a", "b", "a"],
                                 acc=torch.tensor([1.0, 0.0, 1.0]), s_target=np.array([0.5, float("nan"), -1.25]))
    assert n == 3
    assert logs.append_rollout_dump(p, 4, [torch.tensor([3.0])], ["csqa"], uid=["c"], acc=[0.0], s_target=[0.0]) == 1
    back = logs.load_rollout_dump(p)
    assert [r["step"] for r in back] == [3, 3, 3, 4]  # appended, not overwritten
    # entropies are exact float32 values (shortest decimal that reads back as the same float32)
    assert torch.equal(torch.tensor(back[0]["entropy"], dtype=torch.float32), ents[0])
    assert back[0] == {"step": 3, "data_source": "math", "entropy": [0.1234567, 2.0], "uid": "a", "acc": 1.0,
                       "s_target": 0.5}
    assert back[1]["entropy"] == [] and back[1]["s_target"] is None  # NaN -> null
    assert back[2]["entropy"] == [1.0, 0.5, 0.25] and back[3]["data_source"] == "csqa"
    with pytest.raises(ValueError, match="data_sources"):
        logs.append_rollout_dump(p, 5, ents, ["math"])
    with pytest.raises(ValueError, match="'acc'"):
        logs.append_rollout_dump(p, 5, ents, ["a", "b", "c"], acc=[1.0])
    with pytest.raises(ValueError, match="1-D"):
        logs.append_rollout_dump(p, 5, [torch.tensor(1.0)], ["a"])
    assert len(logs.load_rollout_dump(p)) == 4  # failed calls wrote nothing


def test_load_metrics_trl_trainer_state(tmp_path):
    from heal.cli import main

    state = {
        "global_step": 3,
        "log_history": [
            {"step": 1, "eda/entropy_mean_target": 0.41, "eda/entropy_mean_general": 0.6, "loss": 0.1, "epoch": 0.5},
            {"step": 2, "eda/entropy_mean_target": 0.38, "eda/entropy_mean_general": float("nan")},
            {"train_runtime": 12.0},  # no step: skipped
            {"step": 3, "eda/entropy_mean_target": 0.35, "eda/entropy_mean_general": 0.62},
        ],
    }
    p = tmp_path / "checkpoint-3" / "trainer_state.json"
    p.parent.mkdir()
    p.write_text(json.dumps(state, indent=2))
    m = logs.load_metrics(str(p))
    assert list(m) == [1, 2, 3]
    assert m[1] == {"eda/entropy_mean_target": 0.41, "eda/entropy_mean_general": 0.6, "loss": 0.1, "epoch": 0.5}
    assert m[2] == {"eda/entropy_mean_target": 0.38}
    assert main(["plot", "curves", str(p), "--output", str(tmp_path / "c.png")]) == 0
    assert _is_png(str(tmp_path / "c.png"))
    p.write_text(json.dumps({"log_history": [{"train_runtime": 1.0}]}))
    with pytest.raises(ValueError, match="no metrics"):
        logs.load_metrics(str(p))


# ------------------------------------------------------------------ maths behind the heatmap


def test_distance_matrix_is_minus_reference_similarity():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.rand(n, generator=g) * 2 for n in (5, 17, 1, 9, 33)]
    d = plots.distance_matrix([s.tolist() for s in seqs])
    assert d.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            ref = -reference.kl_similarity(seqs[i], seqs[j])
            assert d[i, j] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert np.allclose(np.diag(d), 0.0, atol=1e-6)
    assert (d >= -1e-6).all()


def test_distance_matrix_empty_trajectory_is_nan():
    d = plots.distance_matrix([[0.1, 0.2], [], [0.3]])
    assert np.isnan(d[1]).all() and np.isnan(d[:, 1]).all()
    assert np.isfinite(d[np.ix_([0, 2], [0, 2])]).all()


def test_domain_order():
    order, names = plots.domain_order(["g", "t", "g", "x", "t"], first=["t"])
    assert names == ["t", "g", "x"] and order == [1, 4, 0, 2, 3]


# ------------------------------------------------------------------ figures


def test_heatmap_entropy_dynamics_and_curves(tmp_path):
    g = torch.Generator().manual_seed(1)
    ents = [(torch.rand(int(n), generator=g) * 3).tolist() for n in torch.randint(3, 40, (10,), generator=g)]
    ents[3] = []
    doms = ["math"] * 5 + ["commonsense_qa"] * 5
    h = plots.plot_distance_heatmap(ents, doms, str(tmp_path / "h.png"), first=["math"])
    e = plots.plot_entropy_dynamics(ents, doms, str(tmp_path / "e.png"))
    assert _is_png(h) and _is_png(e)
    metrics = {s: {"eda/entropy_target": 1.0 / (s + 1), "eda/entropy_general": 0.5, "actor/entropy": 0.7} for s in range(20)}
    assert plots.entropy_metric_keys(metrics) == ["eda/entropy_general", "eda/entropy_target"]
    c = plots.plot_entropy_curves(metrics, str(tmp_path / "c.png"), smooth=3)
    assert _is_png(c)
    assert plots.entropy_metric_keys({0: {"actor/entropy": 1.0}}) == ["actor/entropy"]
    # the keys heal.reward.eda_step reports
    step_keys = {0: {"eda/entropy_mean_target": 0.3, "eda/entropy_mean_general": 0.5, "eda/rate_target": 0.2}}
    assert plots.entropy_metric_keys(step_keys) == ["eda/entropy_mean_general", "eda/entropy_mean_target"]
    trl_keys = {0: dict(step_keys[0], **{"eda/entropy_forward_time_s": 0.2, "eda/entropy_shared_pass": 0.0,
                                         "eda/entropy_source": 2.0, "eda/capture_time_s": 0.04})}
    assert plots.entropy_metric_keys(trl_keys) == ["eda/entropy_mean_general", "eda/entropy_mean_target"]
    with pytest.raises(ValueError, match="not in the log"):
        plots.plot_entropy_curves(metrics, str(tmp_path / "x.png"), keys=["nope"])
    with pytest.raises(ValueError, match="no entropy metrics"):
        plots.plot_entropy_curves({0: {"loss": 1.0}}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="same length"):
        plots.plot_distance_heatmap(ents, doms[:3], str(tmp_path / "x.png"))


def test_heatmaps_by_step_and_plot_cli(tmp_path):
    from heal.cli import main

    g = torch.Generator().manual_seed(2)
    recs = []
    for step in (0, 50, 100):
        for k in range(6):
            n = int(torch.randint(4, 30, (1,), generator=g))
            recs.append({"step": step, "data_source": "math" if k < 4 else "csqa",
                         "entropy": (torch.rand(n, generator=g) * (1 + step / 50)).tolist()})
    dump = str(tmp_path / "roll.jsonl")
    logs.write_rollout_dump(dump, recs)
    out = plots.plot_distance_heatmaps_by_step(recs, str(tmp_path / "f9.png"), data_source="math")
    assert _is_png(out)
    with pytest.raises(ValueError, match="steps \\[7\\]"):
        plots.plot_distance_heatmaps_by_step(recs, str(tmp_path / "x.png"), steps=[7])
    with pytest.raises(ValueError, match="no rollout records"):
        plots.plot_distance_heatmaps_by_step(recs, str(tmp_path / "x.png"), data_source="code")

    assert main(["plot", "heatmap", dump, "--steps", "0", "100", "--output", str(tmp_path / "cli_h.png")]) == 0
    assert _is_png(str(tmp_path / "cli_h.png"))
    assert main(["plot", "dynamics", dump]) == 0
    assert _is_png(str(tmp_path / "roll.dynamics.png"))
    mlog = tmp_path / "metrics.jsonl"
    mlog.write_text("".join(json.dumps({"step": s, "data": {"eda/entropy_target": 0.5 - s / 100}}) + "\n" for s in range(10)))
    assert main(["plot", "curves", str(mlog)]) == 0
    assert _is_png(str(tmp_path / "metrics.entropy.png"))
    assert main(["plot", "curves", str(tmp_path / "missing.jsonl")]) == 2


def test_plot_titles_name_the_entropy_temperature(tmp_path, monkeypatch):
    """heal.entropy_temperature reaches the titles: rollout dumps carry ``entropy_temperature``, verl's
    metrics ``heal/entropy_temperature``; logs without it keep the plain titles."""
    from heal.cli import main

    titles = []
    real_save = plots._save

    def save(fig, path):
        titles.append(" | ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [a.get_title() for a in fig.axes]))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    assert plots.entropy_temperature_note([None, 0.7, 0.7]) == " (entropy at T=0.7)"
    assert plots.entropy_temperature_note([]) == "" and plots.entropy_temperature_note([None]) == ""
    recs = [{"step": 1, "data_source": d, "entropy": [0.1 * (i + k) for i in range(8)], "entropy_temperature": 1.0}
            for k, d in enumerate(["math", "math", "csqa"])]
    dump = str(tmp_path / "r.jsonl")
    logs.write_rollout_dump(dump, recs)
    assert main(["plot", "heatmap", dump, "--output", str(tmp_path / "h.png")]) == 0
    assert main(["plot", "dynamics", dump, "--output", str(tmp_path / "d.png")]) == 0
    assert "(entropy at T=1)" in titles[0] and "(entropy at T=1)" in titles[1]
    metrics = {s: {"eda/entropy_mean_target": 0.5, "heal/entropy_temperature": 0.7} for s in range(3)}
    plots.plot_entropy_curves(metrics, str(tmp_path / "c.png"))
    assert "(entropy at T=0.7)" in titles[2]
    plots.plot_entropy_curves({0: {"eda/entropy_mean_target": 0.5}}, str(tmp_path / "c2.png"))
    assert "entropy at" not in titles[3]
