"""Pictures: ``report --plot``, ``bench model --plot`` and the curves ``finetune`` saves. Each is
checked as a file (PNG signature and pixel size, SVG root) and by what it draws (bars, points),
counted on the figure the plotting function returns."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from monarchify import plots  # noqa: E402
from monarchify.cli.app import main  # noqa: E402
from monarchify.hf.convert import convert_pretrained  # noqa: E402
from monarchify.config import MonarchConfig  # noqa: E402
from monarchify.report import LayerReport  # noqa: E402
from tests import test_bench_cli  # noqa: E402
from tests.test_bench_cli import QUICK  # noqa: E402

fake_clock = test_bench_cli.fake_clock  # the fixture, shared
bench_figure = plots.bench_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def expected_pixels(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches()
    return round(width * plots.DPI), round(height * plots.DPI)


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def layer(name: str, nblocks: int = 4, error: float | None = 0.5, kept_dense: bool = False) -> LayerReport:
    return LayerReport(name=name, kind="Linear", shape=[64, 64], nblocks=1 if kept_dense else nblocks, padded=False,
                       bias=True, params_dense=64 * 64 + 64, params_monarch=64 * 64 + 64 if kept_dense else 2 * 64 * 64 // nblocks + 64,
                       rel_error=None if kept_dense else error, kept_dense=kept_dense)


def test_layers_figure_draws_a_bar_per_layer_and_panel_in_the_given_order():
    names = [f"encoder.layer.{b}.{part}" for b in (0, 1, 2) for part in ("attention.self.query", "attention.output.dense", "output.dense")]
    layers = [layer(n, error=0.1 * (i + 1), kept_dense=(i == 4)) for i, n in enumerate(names)]
    figure = plots.layers_figure(layers, title="t")
    top, bottom = figure.axes
    assert len(top.patches) == len(bottom.patches) == len(layers)
    heights = [patch.get_height() for patch in top.patches]
    assert heights[4] == 0 and heights[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # kept dense: no error bar
    kept = [patch.get_height() for patch in bottom.patches]
    assert kept[4] == 1.0 and kept[0] == pytest.approx((2 * 64 * 64 // 4 + 64) / (64 * 64 + 64))
    labels = [tick.get_text() for tick in bottom.get_xticklabels()]
    assert labels[:3] == ["query", "attention.output", "output"]
    texts = [text.get_text() for text in top.texts]
    assert [t for t in texts if t.startswith("block")] == ["block 0", "block 1", "block 2"] and "dense" in texts
    plots.pyplot().close(figure)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_saved_pictures_are_valid_files_of_the_figure_s_size(tmp_path, suffix):
    figure = plots.layers_figure([layer(f"h.{i}.mlp.c_fc") for i in range(4)])
    size = expected_pixels(figure)
    path = plots.save_figure(figure, tmp_path / f"layers{suffix}")
    if suffix == ".png":
        assert png_size(path) == size
    else:
        text = path.read_text(encoding="utf-8")
        assert "<svg" in text and text.rstrip().endswith("</svg>")


def test_training_figure_has_the_loss_per_step_and_a_point_per_evaluation():
    history = [{"step": s, "epoch": s / 4, "loss": 1.0 / s} for s in range(1, 9)]
    history += [{"step": 4, "eval_validation_loss": 0.6, "eval_validation_accuracy": 0.7, "eval_validation_f1": 0.8},
                {"step": 8, "eval_validation_loss": 0.5, "eval_validation_accuracy": 0.75, "eval_validation_f1": 0.82,
                 "eval_validation_runtime": 1.0}]
    figure = plots.training_figure(history)
    left, right = figure.axes
    lines = {line.get_label(): line for line in left.lines}
    assert len(lines["training loss"].get_xdata()) == 8 and list(lines["validation loss"].get_xdata()) == [4, 8]
    metrics = {line.get_label(): list(line.get_ydata()) for line in right.lines}
    assert metrics == {"validation accuracy": [0.7, 0.75], "validation f1": [0.8, 0.82]}  # no runtime
    plots.pyplot().close(figure)


def test_bench_figure_pairs_dense_and_monarch_per_stage():
    result = {"inference": {"dense_ms": 10.0, "monarch_ms": 8.0, "ratio": 1.25},
              "train_step": {"dense_ms": 30.0, "monarch_ms": 40.0, "ratio": 0.75}}
    figure = plots.bench_figure(result)
    (axis,) = figure.axes
    assert sorted(patch.get_height() for patch in axis.patches) == [8.0, 10.0, 30.0, 40.0]
    texts = [text.get_text() for text in axis.texts]
    assert "1.25× faster" in texts and "1.33× slower" in texts
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["inference", "training step"]
    plots.pyplot().close(figure)


# ------------------------------------------------------------------------------- commands


@pytest.fixture
def converted(tmp_path, bert_folder) -> Path:
    folder = tmp_path / "bert-monarch"
    convert_pretrained(bert_folder, folder, MonarchConfig(nblocks=2), check=False)
    return folder


def test_report_plot_writes_the_picture(capsys, tmp_path, converted, monkeypatch):
    drawn = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: (drawn.append(figure), save(figure, path))[1])
    picture = tmp_path / "layers.png"
    code, out, err = run(capsys, "report", converted, "--plot", picture)
    assert code == 0, err
    (figure,) = drawn
    top, bottom = figure.axes
    assert len(top.patches) == len(bottom.patches) == len(bottom.get_xticklabels()) == 12  # the report's 12 layers
    assert png_size(picture) == tuple(round(inches * plots.DPI) for inches in figure.get_size_inches())  # that figure, saved
    assert "saved" in err and str(picture) in err.replace("\n", "")


@pytest.mark.parametrize("name,fragment", [("layers.jpg", "must end in .png or .svg"), ("nowhere/layers.png", "does not exist")])
def test_report_plot_bad_file_is_one_line(capsys, tmp_path, converted, name, fragment):
    code, out, err = run(capsys, "report", converted, "--plot", tmp_path / name)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], err


def test_without_matplotlib_the_plot_flag_says_how_to_install_it(capsys, monkeypatch, tmp_path, converted):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = run(capsys, "report", converted, "--plot", tmp_path / "layers.png")
    lines = err.strip().splitlines()
    assert code == 1 and lines == ['Error: pictures need matplotlib: pip install "monarchify[plot]"']
    assert not (tmp_path / "layers.png").exists()


def test_bench_model_plot(capsys, monkeypatch, tmp_path, bert_folder, fake_clock):
    drawn = []
    monkeypatch.setattr(plots, "bench_figure", lambda *a, **k: drawn.append(bench_figure(*a, **k)) or drawn[-1])
    picture = tmp_path / "bench.svg"
    code, out, err = run(capsys, "bench", "model", bert_folder, "--nblocks", "2", "--batch-size", "2", "--seq-len", "8",
                         "--plot", picture, "--json", *QUICK)
    assert code == 0, err
    text = picture.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")
    (axis,) = drawn[0].axes
    result = json.loads(out)  # --json stays clean with --plot
    assert sorted(p.get_height() for p in axis.patches) == sorted(
        result[stage][kind] for stage in ("inference", "train_step") for kind in ("dense_ms", "monarch_ms"))


def test_importing_the_plots_module_loads_no_matplotlib():
    """``report`` and ``bench`` import it for every run; only a picture needs matplotlib."""
    import subprocess

    code = "import sys, monarchify.plots, monarchify.cli.report\nprint('matplotlib' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_finetune_without_matplotlib_saves_everything_but_the_curves(tmp_path, monkeypatch, bert_folder):
    from monarchify.glue import FinetuneEvents, finetune
    from monarchify.glue.options import CURVES_FILE, RESULTS_FILE
    from tests.test_finetune import options, write_sst2

    class Notes(FinetuneEvents):
        said: list[str] = []

        def note(self, message: str) -> None:
            self.said.append(message)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    opts = options(tmp_path, bert_folder, data, max_steps=2)
    finetune(opts, events=Notes(), progress_bar=False)
    assert (opts.out / RESULTS_FILE).is_file() and not (opts.out / CURVES_FILE).exists()
    assert any(CURVES_FILE in note and "monarchify[plot]" in note for note in Notes.said), Notes.said
