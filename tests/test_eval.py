"""``monarchify eval`` and :mod:`monarchify.lm.perplexity`: the windows' negative log-likelihood
against hand-written computations on a tiny random Llama (float64), dense and Monarch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monarchify.lm.perplexity import perplexity, plan_windows, read_text
from test_bench_cli import run
from tests.conftest import WORDS, tiny_llama

WINDOW = 12


def one_line_error(code, err, fragment):
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    return code == 1 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in err


def next_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[i] | ids[:i]) for i >= 1, from the logits, by hand."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    return -log_probs[:-1].gather(1, ids[1:, None]).squeeze(1)


def brute_force(model, ids: torch.Tensor, stride: int, bos: int | None) -> torch.Tensor:
    """The NLL of every scored token, one forward pass each: token t is scored by the first
    window that holds it, whose start is k * stride for the smallest k with
    k * stride + WINDOW > t, given that window's tokens before it (and the BOS)."""
    prefix = torch.tensor([] if bos is None else [bos], dtype=torch.long)
    nlls = []
    for t in range(len(ids)):
        begin = max(0, (t - WINDOW) // stride + 1) * stride
        context = torch.cat([prefix, ids[begin : t + 1]])
        if len(context) > 1:
            nlls.append(next_token_nll(model, context)[-1])
    return torch.stack(nlls)


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama().double()


@pytest.fixture(scope="module")
def tokenizer():
    from monarchify.lm.text import train_tokenizer

    lines = [" ".join(WORDS[i : i + 7]) for i in range(0, len(WORDS), 3)]
    tokenizer = train_tokenizer(lines, 300, "causal")
    tokenizer.add_special_tokens({"bos_token": "<|endoftext|>"})  # a BOS for --bos, which text does not get by itself
    return tokenizer


@pytest.fixture
def llama_folder(tmp_path, tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    lines = [" = Heading = ", ""] + [" ".join(WORDS[i : i + 9]) for i in range(0, len(WORDS) - 9, 2)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_non_overlapping_windows_match_a_hand_written_loop(llama64):
    """Every window on its own, all tokens but its first scored; the short last window too."""
    ids = torch.randint(0, 120, (5 * WINDOW + 7,), generator=torch.Generator().manual_seed(1))
    nlls = [next_token_nll(llama64, ids[b : b + WINDOW]) for b in range(0, len(ids), WINDOW)]
    expected = torch.cat(nlls)
    result = perplexity(llama64, ids, window=WINDOW, batch_size=2)
    assert result.windows == 6 and result.tokens == len(ids) - 6 == expected.numel()
    assert result.nll == pytest.approx(float(expected.mean()), rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(float(expected.mean())), rel=1e-12)
    assert (result.window, result.stride, result.bos, result.text_tokens) == (WINDOW, WINDOW, False, len(ids))


def test_bos_before_every_window_scores_every_token(llama64):
    ids = torch.randint(0, 120, (3 * WINDOW,), generator=torch.Generator().manual_seed(2))
    bos = torch.tensor([7])
    expected = torch.cat([next_token_nll(llama64, torch.cat([bos, ids[b : b + WINDOW]])) for b in range(0, len(ids), WINDOW)])
    result = perplexity(llama64, ids, window=WINDOW, bos_id=7, batch_size=8)
    assert result.tokens == len(ids) and result.bos
    assert result.nll == pytest.approx(float(expected.mean()), rel=1e-12)


@pytest.mark.parametrize("bos", [None, 7])
def test_overlapping_windows_score_each_token_once_with_its_window_s_context(llama64, bos):
    stride, n = 5, 41
    ids = torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(3))
    expected = brute_force(llama64, ids, stride, bos)
    result = perplexity(llama64, ids, window=WINDOW, stride=stride, bos_id=bos, batch_size=3)
    assert result.tokens == len(expected) == n - (bos is None)
    assert result.nll == pytest.approx(float(expected.mean()), rel=1e-12)
    assert result.stride == stride and result.windows == len(plan_windows(n, WINDOW, stride, bos=bos is not None))


def test_max_tokens_scores_only_the_text_s_start(llama64):
    ids = torch.randint(0, 120, (4 * WINDOW,), generator=torch.Generator().manual_seed(4))
    cut = perplexity(llama64, ids, window=WINDOW, max_tokens=2 * WINDOW)
    whole = perplexity(llama64, ids[: 2 * WINDOW], window=WINDOW)
    assert cut.nll == whole.nll and cut.text_tokens == 2 * WINDOW and cut.windows == 2


def test_text_keeps_blank_lines_and_joins_files_with_newlines(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(" = A = \n\n one line\n", encoding="utf-8")
    second.write_text("two\r\nthree", encoding="utf-8")
    assert read_text([first, second]) == " = A = \n\n one line\ntwo\nthree\n"


def test_cli_agrees_with_the_hand_loop_on_the_folder_s_tokens(capsys, llama_folder, text_file, tokenizer):
    code, out, err = run(capsys, "eval", llama_folder, "--text", text_file, "--max-length", WINDOW, "--json")
    assert code == 0, err
    result = json.loads(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_folder).double().eval()
    ids = torch.tensor(tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    expected = torch.cat([next_token_nll(model, ids[b : b + WINDOW]) for b in range(0, len(ids), WINDOW) if len(ids) - b > 1])
    assert result["tokens"] == expected.numel() and result["bos"] is False  # the tokenizer adds no BOS by itself
    assert result["nll"] == pytest.approx(float(expected.mean()), rel=1e-5)  # float32 model against float64
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert result["seconds"] > 0 and result["window"] == result["stride"] == WINDOW


def test_cli_on_a_monarch_folder_is_the_monarch_model_s_perplexity(capsys, llama_folder, text_file, tmp_path, tokenizer):
    out_dir = tmp_path / "monarch"
    code, _, err = run(capsys, "convert", llama_folder, "-b", "2", "-o", out_dir, "--no-check")
    assert code == 0, err
    code, out, err = run(capsys, "eval", out_dir, "--text", text_file, "--max-length", WINDOW, "--stride", 8, "--bos", "--json")
    assert code == 0, err
    monarch = json.loads(out)

    import monarchify  # noqa: F401 - the transformers plug-in that reads Monarch folders
    from transformers import AutoModelForCausalLM

    from monarchify.monarch import MonarchLinear

    model = AutoModelForCausalLM.from_pretrained(out_dir).double().eval()
    assert any(isinstance(m, MonarchLinear) for m in model.modules())
    ids = torch.tensor(tokenizer(read_text([text_file]), add_special_tokens=False)["input_ids"])
    expected = brute_force(model, ids, 8, tokenizer.bos_token_id)
    assert monarch["tokens"] == len(ids) == expected.numel()
    assert monarch["nll"] == pytest.approx(float(expected.mean()), rel=1e-5)
    code, out, err = run(capsys, "eval", llama_folder, "--text", text_file, "--max-length", WINDOW, "--stride", 8, "--bos", "--json")
    assert code == 0, err
    assert abs(json.loads(out)["nll"] - monarch["nll"]) > 1e-3  # the Monarch model was scored, not a dense one


def test_cli_table_and_progress_for_people(capsys, llama_folder, text_file):
    code, out, err = run(capsys, "eval", llama_folder, "--text", text_file, "--max-length", WINDOW, "--max-tokens", 3 * WINDOW,
                         "--threads", 1)
    assert code == 0, err
    assert "perplexity" in out and f"{3 * WINDOW - 3} tokens" in out and f"3 windows of {WINDOW} tokens, no BOS" in out


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--text", "MISSING"), "does not exist"),
        (("--max-length", 24, "--max-tokens", 20), "the text has 20 tokens, fewer than one window of 24"),
        (("--max-length", 32, "--bos"), "longer than the model's 32 positions"),
        (("--max-length", 8, "--stride", 9), "--stride between 1 and --max-length"),
        (("--max-tokens", 0), "--max-tokens must be >= 1"),
        (("--threads", 0), "--threads must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, llama_folder, text_file, tmp_path, args, fragment):
    if "MISSING" in args:
        args = ("--text", tmp_path / "missing.txt")
    else:
        args = ("--text", text_file, *args)
    code, _, err = run(capsys, "eval", llama_folder, *args)
    assert one_line_error(code, err, fragment), err


def test_cli_refuses_a_model_that_is_not_causal(capsys, bert_folder, text_file):
    code, _, err = run(capsys, "eval", bert_folder, "--text", text_file)
    assert one_line_error(code, err, "not a causal language model"), err
