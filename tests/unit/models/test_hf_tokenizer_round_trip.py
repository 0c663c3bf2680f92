"""Tokenizers and chat templates survive import-hf -> sft -> align -> export-hf, checked against transformers
and TRL themselves: declared special tokens (never guessed by name), the template in ``chat_template.jinja`` or
``tokenizer_config.json``, the document prefix (``tokenizer(text)`` in transformers == lmlab's ids), bare-prompt
greedy generation, ``{% generation %}`` markers and TRL's assistant-only labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")

from unit.models.conftest import HF_VOCAB  # noqa: E402
from unit.models.test_hf import COMMON, _randomize  # noqa: E402

from lmlab.cli import main as cli_main  # noqa: E402
from lmlab.config import RunConfig, TokenizerConfig, load_config, save_config  # noqa: E402
from lmlab.data.chat import render_conversation  # noqa: E402
from lmlab.data.tokenizer import TextTokenizer  # noqa: E402
from lmlab.errors import DataError  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.recipes.align import run_align  # noqa: E402
from lmlab.recipes.hf_commands import export_hf, import_hf  # noqa: E402
from lmlab.recipes.sft import run_sft  # noqa: E402
from lmlab.train.checkpoint import save_checkpoint  # noqa: E402
from lmlab.train.pretrained import run_tokenizer  # noqa: E402

from helpers import model_cfg  # noqa: E402

TEXTS = ["hello there, how are you today? I am fine, thank you.", "the quick brown fox jumps over the lazy dog"] * 20
PROMPTS = ["hello there", "the quick brown", "I am", "fox jumps over the lazy"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen-style: "</s>" is in the vocabulary too (name guessing picked it over the declared <|im_end|>)
STYLES = {
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>"],
        declared=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        template=CHATML,
        stop=["<|im_end|>", "<|endoftext|>"],
        config=transformers.Qwen2Config,
    ),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        declared=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        template=LLAMA3,
        stop=["<|end_of_text|>", "<|eot_id|>"],
        config=transformers.LlamaConfig,
    ),
}
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "I am fine"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "thank you"},
]


def _backend(style: str) -> Tokenizer:
    """A byte-level BPE with the style's special tokens; Llama 3's post-processor puts BOS before a text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = STYLES[style]["specials"]
    trainer = trainers.BpeTrainer(
        vocab_size=HF_VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if style == "llama3":
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def hf_model_dir(root: Path, style: str, template_in: str = "jinja") -> Path:
    """A Hugging Face model directory as transformers writes it: random weights, the tokenizer with its declared
    tokens and chat template (``chat_template.jinja``, transformers 5; or inside ``tokenizer_config.json``)."""
    spec = STYLES[style]
    backend = _backend(style)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **spec["declared"])
    hf_tok.chat_template = spec["template"]
    stop_ids = [backend.token_to_id(t) for t in spec["stop"]]
    ids = {"eos_token_id": stop_ids[0], "bos_token_id": hf_tok.bos_token_id, "pad_token_id": hf_tok.pad_token_id}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(spec["config"](**COMMON, **ids)).eval()
    _randomize(model, seed=1)
    model.generation_config.eos_token_id = stop_ids
    path = root / f"{style}_{template_in}"
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    if template_in == "config":  # the transformers 4 layout
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = (path / "chat_template.jinja").read_text()
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        (path / "chat_template.jinja").unlink()
    return path


@pytest.fixture(scope="module")
def lmlab_run(tmp_path_factory) -> Path:
    """A run of lmlab's own: its BPE (with chat tokens), random weights."""
    root = tmp_path_factory.mktemp("own")
    tok = TextTokenizer.train_bpe(TEXTS, 340)
    cfg = RunConfig(
        model=model_cfg(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=16),
        tokenizer=TokenizerConfig(path=str(root / "run" / "tokenizer.json")),
    )
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    _randomize(model, seed=2)
    save_checkpoint(root / "run", 1, model, model_cfg=cfg.model)
    save_config(cfg, root / "run" / "config.yaml")
    tok.save(root / "run" / "tokenizer.json")
    return root / "run"


@pytest.mark.parametrize("style,template_in", [("chatml", "jinja"), ("chatml", "config"), ("llama3", "jinja")])
def test_import_reads_the_declared_tokens_and_the_template(tmp_path, style, template_in):
    spec = STYLES[style]
    src = hf_model_dir(tmp_path, style, template_in)
    original = transformers.AutoTokenizer.from_pretrained(src)
    import_hf(src, tmp_path / "run")
    tok = run_tokenizer(tmp_path / "run")
    assert tok.id_to_token(tok.eos_id) == spec["declared"]["eos_token"]  # not "</s>" by name
    assert tok.bos_id == original.bos_token_id and tok.pad_id == original.pad_token_id
    assert [tok.id_to_token(i) for i in tok.stop_ids] == [spec["declared"]["eos_token"], *[
        t for t in spec["stop"] if t != spec["declared"]["eos_token"]
    ]]  # fmt: skip
    assert tok.chat_template == spec["template"]
    # the source model's own document start: Llama 3's BOS, nothing for ChatML (Qwen) tokenizers
    for text in PROMPTS:
        assert tok.encode_document(text) == original(text)["input_ids"]
    rendered = original.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(render_conversation(tok, CONV)[0]) == rendered


@pytest.mark.parametrize("which", ["lmlab", "chatml", "llama3"])
def test_exported_tokenizer_encodes_and_generates_as_lmlab(tmp_path, lmlab_run, which, capsys):
    """transformers' ``tokenizer(text)`` on the export == lmlab's ids, and bare-prompt greedy generation in
    transformers (the export's generation_config) == ``lmlab generate --temperature 0``."""
    run = lmlab_run if which == "lmlab" else tmp_path / "run"
    if which != "lmlab":
        import_hf(hf_model_dir(tmp_path, which), run)
    out = export_hf(run, tmp_path / "export")
    tok = run_tokenizer(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tok.stop_ids)
    assert not {"do_sample", "temperature", "top_k", "top_p"} & set(generation)
    lengths = []
    for text in PROMPTS:
        assert hf_tok(text)["input_ids"] == tok.encode_document(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        with torch.no_grad():
            ids = hf_model.generate(**hf_tok(text, return_tensors="pt"), do_sample=False, max_new_tokens=12)
        theirs = text + hf_tok.decode(ids[0, len(tok.encode_document(text)) :], skip_special_tokens=True)
        assert cli_main(["generate", str(run), "--prompt", text, "--temperature", "0", "--max-new-tokens", "12"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == theirs
        lengths.append(len(theirs) - len(text))
    assert max(lengths) > 0


def test_chat_template_survives_import_sft_align_export(tmp_path):
    src = hf_model_dir(tmp_path, "chatml")
    original = transformers.AutoTokenizer.from_pretrained(src)
    import_hf(src, tmp_path / "imported")
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(8)))
    pair = {"prompt": [CONV[1]], "chosen": "I am fine", "rejected": "no"}
    (data / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for _ in range(8)))
    common = ["train.steps=1", "train.micro_batch_size=2", "train.device=cpu", "train.progress=false"]
    common += ["schedule.warmup_steps=0", "train.seq_len=64", "train.eval_every=100", "sample.max_new_tokens=2"]
    sft = load_config(None, [*common, f"init_from={tmp_path / 'imported'}", f"sft.train_file={data / 'sft.jsonl'}"])
    run_sft(sft, tmp_path / "sft", quiet=True)
    align = load_config(
        None,
        [
            *common,
            f"init_from={tmp_path / 'sft'}",
            f"align.train_file={data / 'pairs.jsonl'}",
            "align.max_len=96",
            "align.max_prompt_len=48",
        ],
    )
    run_align(align, tmp_path / "align", quiet=True)
    for run in ("sft", "align"):
        assert run_tokenizer(tmp_path / run).chat_template == CHATML
        assert run_tokenizer(tmp_path / run).id_to_token(run_tokenizer(tmp_path / run).eos_id) == "<|im_end|>"
    exported = transformers.AutoTokenizer.from_pretrained(export_hf(tmp_path / "align", tmp_path / "export"))
    for messages, opening in ((CONV, False), (CONV[:2], True)):
        before = original.apply_chat_template(messages, tokenize=False, add_generation_prompt=opening)
        assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=opening) == before
    assert exported.eos_token == "<|im_end|>"


def test_trl_assistant_only_labels_equal_lmlab_loss_mask(tmp_path, lmlab_run):
    """The exported template's ``{% generation %}`` markers give TRL's SFTTrainer (assistant_only_loss) exactly
    the tokens lmlab's SFT learns: each reply and its end-of-turn marker."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    out = export_hf(lmlab_run, tmp_path / "export")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids, mask = render_conversation(run_tokenizer(lmlab_run), CONV)
    marked = hf_tok.apply_chat_template(CONV, return_assistant_tokens_mask=True, return_dict=True)
    assert marked["input_ids"] == ids and marked["assistant_masks"] == [int(m) for m in mask]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[], use_cpu=True, max_length=None
    )
    trainer = trl.SFTTrainer(
        model=str(out), args=args, train_dataset=datasets.Dataset.from_list([{"messages": CONV}]),
        processing_class=hf_tok,
    )  # fmt: skip
    row = trainer.train_dataset[0]
    assert row["input_ids"] == ids
    assert row["labels"] == [i if m else -100 for i, m in zip(ids, mask)]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_imported_templates_are_exported_with_generation_markers(tmp_path, style):
    """An imported template without ``{% generation %}`` is exported with markers that select exactly lmlab's loss
    mask in transformers' ``return_assistant_tokens_mask``, and renders the same text as before."""
    src = hf_model_dir(tmp_path, style)
    original = transformers.AutoTokenizer.from_pretrained(src)
    import_hf(src, tmp_path / "imported")
    exported = transformers.AutoTokenizer.from_pretrained(export_hf(tmp_path / "imported", tmp_path / "export"))
    assert "{% generation %}" in exported.chat_template and "{% generation %}" not in original.chat_template
    for messages, opening in ((CONV, False), (CONV[:2], True)):
        before = original.apply_chat_template(messages, tokenize=False, add_generation_prompt=opening)
        assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=opening) == before
    ids, mask = render_conversation(run_tokenizer(tmp_path / "imported"), CONV)
    marked = exported.apply_chat_template(CONV, return_assistant_tokens_mask=True, return_dict=True)
    assert marked["input_ids"] == ids
    assert marked["assistant_masks"][1:] == [int(m) for m in mask][1:] and sum(mask) > 0


def test_a_template_the_markers_cannot_fit_is_exported_unchanged():
    from lmlab.data.template_markers import add_generation_markers

    tok = TextTokenizer.train_bpe(TEXTS, 340)
    # the reply goes through a variable (as in Qwen3's template) or one expression writes header and reply: the
    # markers cannot be placed by this rewrite, and the template is kept as it is
    via_variable = "{% for m in messages %}{% set c = m['content'] %}<{{ m['role'] }}>{{ c }}\n{% endfor %}"
    one_expression = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}\n{% endfor %}"
    assert add_generation_markers(via_variable, tok) is None
    assert add_generation_markers(one_expression, tok) is None
    # a body that writes after the reply is marked to its end: lmlab learns what follows a reply in its turn
    after = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}[{{ m['role'] }}]\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert "{% generation %}{{ m['content'] }}[{{ m['role'] }}]" in add_generation_markers(after, tok)
    assert add_generation_markers("{{ messages[0]['content'] }}", tok) is None  # no loop over the messages


def test_declared_token_missing_from_the_vocabulary_names_the_file(tmp_path):
    src = hf_model_dir(tmp_path, "chatml")
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=r"no eos token '<\|nope\|>'.*tokenizer_config.json"):
        import_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_declaring_no_eos_is_refused(tmp_path):
    src = hf_model_dir(tmp_path, "chatml")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "generation_config.json").unlink()
    hf_config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": None}))
    with pytest.raises(DataError, match="declares no end-of-sequence token"):
        import_hf(src, tmp_path / "run")
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
