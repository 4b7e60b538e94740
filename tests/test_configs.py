"""The paper's configs (configs/llama.py, configs/falcon.py: configs/presets.py).

Every model variant and hardware preset loads and passes the entry point's validation and the
model / mesh / batch checks; the variants' architectures have the published parameter counts; the
data loaders read the HF formats (the ToxiGen hub layout and its toxiGen.json export, Wikitext);
and one detox run per model family goes end to end through `python -m regft_jax.main` with tiny
random stand-ins in the HF formats (Llama / Falcon directory with its tokenizer, a RoBERTa
classifier for the ToxiGen oracle) and local dataset fixtures read through the same code path as
the hub names.
"""

import itertools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import falcon, llama, presets  # noqa: E402
from regft_jax import main, sharding  # noqa: E402
from regft_jax.data.hub import load_hub_domains  # noqa: E402
from regft_jax.data.mixture import batch_quotas  # noqa: E402
from regft_jax.data.pipeline import build_corpus  # noqa: E402
from regft_jax.errors import UserInputError  # noqa: E402
from regft_jax.models.core import abstract_params  # noqa: E402
from tests.test_oracles_hf import _randomize, _roberta_tokenizer  # noqa: E402
from tests.test_pipeline import REPO  # noqa: E402

CONFIGS = {"llama": llama, "falcon": falcon}
VARIANTS = [(f, m, h) for f in CONFIGS for m, h in itertools.product(presets.MODELS, presets.HARDWARE)
            if presets.MODELS[m].family == f]
# Falcon-40B (41.3B parameters, an 8-layer auxiliary model of 6.5B): fp32 weights, gradients and
# AdamW moments plus the base model are >= 54 GiB per chip on 16 v4 chips and >= 108 GiB on 8 H100.
REFUSED = {("falcon-40b", "v4-32"), ("falcon-40b", "8xh100")}
# Parameter counts of the released checkpoints (HF model cards / safetensors index metadata).
PUBLISHED = {"llama1-7b": 6_738_415_616, "llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248,
             "falcon-7b": 6_921_720_704}

WORDS = ("river city music moon paints old quiet garden storm bread people always never every their "
         "should would think about those group many these work live").split()
GROUPS = ["asian", "black", "jewish", "women", "lgbtq", "muslim"]
N_TOXIC, N_ARTICLES = 64, 40


# ----------------------------------------------------------------------------- loading and validation


def _preset_mesh(shape) -> AbstractMesh:
    """The preset's mesh without its devices (`auto`: 32 data-parallel shards)."""
    sizes = tuple(shape[a] if shape[a] > 0 else 32 for a in sharding.MESH_AXES)
    return AbstractMesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes))


@pytest.mark.parametrize("family, model, hardware", VARIANTS)
def test_every_variant_and_preset_loads_and_validates(family, model, hardware, monkeypatch):
    if (model, hardware) in REFUSED:
        with pytest.raises(UserInputError, match=f"{model} cannot train on {hardware}.*presets that fit: v5e-64"):
            CONFIGS[family].get_config(f"{model},{hardware}")
        return
    c = CONFIGS[family].get_config(f"{model},{hardware}")
    monkeypatch.setattr(sharding, "make_mesh", _preset_mesh)  # validate against the preset's mesh, not ours
    main._validate(c)
    presets.check_preset(c)
    hw = presets.HARDWARE[hardware]
    assert c.mesh.to_dict() == {"data": 1, "fsdp": hw.devices or -1, "tensor": 1}
    dp = hw.devices or 32  # auto: batches divide every power of two up to 32
    quotas = batch_quotas(dict(c.method.proportions), c.method.batch_size)
    assert quotas == {"general": c.method.batch_size // 2, "toxic": c.method.batch_size // 2}  # equal mixture
    assert all(n % dp == 0 for n in [*quotas.values(), c.method.sample_batch_size, c.eval.batch_size])
    assert (c.model.source, c.model.path, c.data.tokenizer) == ("hf", presets.MODELS[model].path,
                                                                presets.MODELS[model].path)
    assert (c.model.param_dtype, c.model.dtype) == ("float32", "bfloat16")
    assert c.data.source == "hub" and c.data.hub.toxic.name == "skg/toxigen-data"
    assert (c.data.hub.toxic.config, c.data.hub.toxic.split) == ("annotated", "train")
    assert (c.data.hub.general.name, c.data.hub.general.config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert c.method.oracle == "hf_classifier" and c.method.oracle_args.model_dir == presets.TOXIGEN_ROBERTA
    assert c.eval.oracles.split(",")[0] == "hf_classifier"
    assert (c.eval.temperature, c.eval.top_p, c.eval.max_new_tokens) == (0.1, 0.9, 32)  # the ToxiGen protocol
    assert presets.model_config(c).num_layers > c.method.aux_layers


def test_variant_architectures_have_the_published_parameter_counts():
    """model.arch of every variant (from the published config.json keys, through the loader's own
    mapping) has the parameter count of the released model and of transformers' model class."""
    for name, variant in presets.MODELS.items():
        cfg = presets.model_config(presets.paper_config(variant.family, name))
        ours = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params(cfg)))
        hf_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM)}[variant.family]
        hf_config = hf_cls[0](**{k: v for k, v in variant.hf.items() if k != "model_type"})
        with torch.device("meta"):
            reference = sum(p.numel() for p in hf_cls[1](hf_config).parameters())
        assert ours == reference, name
        assert ours == PUBLISHED.get(name, ours), name


def test_config_argument():
    c = llama.get_config()
    assert (c.workdir, c.mesh.fsdp, c.model.path) == ("runs/llama2-7b-auto", -1, "/models/Llama-2-7b-hf")
    assert falcon.get_config().model.path == "/models/falcon-7b"
    c = llama.get_config(" V5E-64, llama3-8b ")
    assert (c.hardware.name, c.mesh.fsdp, c.model.arch.vocab_size) == ("v5e-64", 64, 128256)
    assert llama.get_config("8xh100").model.path == "/models/Llama-2-7b-hf"
    choices = "MODEL one of llama1-7b, llama2-7b, llama3-8b and HARDWARE one of v4-32, v5e-64, 8xh100, auto"
    for bad in ("llama2-13b", "falcon-7b", "llama2-7b,llama3-8b", "v4-32,v5e-64,llama2-7b"):
        with pytest.raises(UserInputError, match=f"configs/llama.py:{bad}: .* {choices}$"):
            llama.get_config(bad)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "regft_jax.main", "--config=configs/falcon.py:falcon-13b"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: configs/falcon.py:falcon-13b: 'falcon-13b' is not a choice")
    assert "falcon-7b, falcon-40b" in out.stderr


def test_check_preset_catches_inconsistent_overrides(monkeypatch):
    c = llama.get_config("llama2-7b,v4-32")
    c.method.batch_size = 48  # 24 rows per domain on 16 data-parallel devices
    with pytest.raises(UserInputError, match=r"method.proportions.general: 24 rows .* data-parallel size 16"):
        presets.check_preset(c)
    c = llama.get_config("llama2-7b,v4-32")
    c.mesh.fsdp = 8
    with pytest.raises(UserInputError, match="expected 16 devices"):
        presets.check_preset(c)
    c = falcon.get_config("falcon-7b,v4-32")  # 71 query heads: no tensor parallelism
    c.mesh.update({"fsdp": 8, "tensor": 2})
    heads = r"model parameter \['layers'\]\['attn'\].* \(32, 71, 64, 4544\): dimension 1 .* tensor"
    with pytest.raises(UserInputError, match=heads):
        presets.check_preset(c)
    c = llama.get_config("llama1-7b,8xh100")
    c.method.aux_layers = 32
    with pytest.raises(UserInputError, match=r"config.method.aux_layers=32: expected 1..31"):
        presets.check_preset(c)
    c = llama.get_config("llama2-7b,v5e-64")  # the entry point's own check, on the preset's 64 shards
    c.method.sample_batch_size = 32
    monkeypatch.setattr(sharding, "make_mesh", _preset_mesh)
    with pytest.raises(UserInputError, match=r"config.method.sample_batch_size=32: .*64"):
        main._validate(c)


# ----------------------------------------------------------------------------- data fixtures (HF formats)


def _toxigen_rows():
    """Rows in the layout of skg/toxigen-data's `annotated` config; hateful iff toxicity_human > 3."""
    rng = np.random.default_rng(1)
    scores = [4.7, 1.3, 3.0, 4.0]  # 3.0 is the boundary: not hateful
    return [{"text": f"{' '.join(rng.choice(WORDS, 9))} {i}", "target_group": GROUPS[i % len(GROUPS)],
             "factual?": "opinion", "intent": scores[i % 4], "toxicity_ai": scores[i % 4],
             "toxicity_human": scores[i % 4], "predicted_author": "human", "actual_method": "topk"}
            for i in range(N_TOXIC)]


def _articles():
    rng = np.random.default_rng(2)
    return [(f"Topic {i}", [f"{' '.join(rng.choice(WORDS, 14))} {i}.{j}" for j in range(2)])
            for i in range(N_ARTICLES)]


def _hub_dir(root, configs: dict) -> str:
    """A dataset directory laid out like an HF hub repo: parquet files per config and split, and
    the README's `configs:` metadata that `datasets.load_dataset(dir, config)` resolves."""
    import datasets

    meta = ["---", "configs:"]
    for config, splits in configs.items():
        meta += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = f"{config}/{split}-00000-of-00001.parquet"
            os.makedirs(os.path.join(root, config), exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(os.path.join(root, path))
            meta += [f"  - split: {split}", f"    path: {path}"]
    (root / "README.md").write_text("\n".join(meta + ["---", ""]))
    return str(root)


def _tokenizer(texts, specials: dict):
    """An HF fast tokenizer (byte-level BPE) with the given special tokens, as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(dict.fromkeys(specials.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    toxigen = _toxigen_rows()
    _hub_dir(root / "toxigen-data", {"annotated": {"train": toxigen, "test": toxigen[:4]}})
    lines = []
    for title, paragraphs in _articles():
        lines += [f" = {title} = \n", ""]
        for j, p in enumerate(paragraphs):
            lines += ([" = = Section = = \n", ""] if j else []) + [f" {p} \n", ""]
    _hub_dir(root / "wikitext", {"wikitext-103-raw-v1": {"train": [{"text": line} for line in lines]}})
    export = [{"id": i, "text": (" " if i % 3 else "") + r["text"].replace(" ", "_x000D_", 1 if i % 5 == 0 else 0),
               "toxicity_score": r["toxicity_human"], "label": "hate" if r["toxicity_human"] > 3 else "neutral",
               "target_groups": [r["target_group"]]} for i, r in enumerate(toxigen)]
    (root / "toxiGen.json").write_text(json.dumps(export, indent=4))
    texts = [r["text"] for r in toxigen] + [p for _, ps in _articles() for p in ps]

    # Tiny random LLMs in the HF layout, each with a tokenizer like its family's (Llama: <s> and </s>;
    # Falcon: only <|endoftext|>, no BOS).
    for family, specials in (("llama", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
                             ("falcon", {"eos_token": "<|endoftext|>"})):
        tok = _tokenizer(texts, specials)
        torch.manual_seed(0)
        if family == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
        else:
            model = transformers.FalconForCausalLM(transformers.FalconConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                parallel_attn=True, new_decoder_architecture=False, bias=False, max_position_embeddings=128))
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)

    # The ToxiGen RoBERTa's stand-in: a random RoBERTa classifier with HF's default label names.
    roberta_tok = _roberta_tokenizer()
    torch.manual_seed(0)
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=len(roberta_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, id2label={0: "LABEL_0", 1: "LABEL_1"})).eval()
    _randomize(roberta, seed=0)
    roberta.save_pretrained(root / "toxigen_roberta")
    roberta_tok.save_pretrained(root / "toxigen_roberta")
    return root


def _words(text: str, n: int = 6) -> str:
    return " ".join(text.split()[:n])


# ----------------------------------------------------------------------------- loaders


def test_hub_loaders_read_the_hf_layouts(fixtures, tmp_path):
    specs = llama.get_config().data.hub.to_dict()
    specs["toxic"]["name"] = str(fixtures / "toxigen-data")
    specs["general"]["name"] = str(fixtures / "wikitext")
    for spec in specs.values():  # an extra key goes to the loader, here to datasets.load_dataset
        spec["cache_dir"] = str(tmp_path / "hf")
    examples = load_hub_domains(specs)
    toxic = [e for e in examples if e.domain == "toxic"]
    rows = _toxigen_rows()
    assert [e.text for e in toxic] == [r["text"] for r in rows]
    assert [e.label for e in toxic] == [float(r["toxicity_human"] > 3) for r in rows]
    assert toxic[2].label == 0.0 and toxic[0].meta["target_groups"] == [GROUPS[0]]
    general = [e for e in examples if e.domain == "general"]
    assert [e.text for e in general] == ["\n".join(ps) for _, ps in _articles()]  # articles, headings dropped
    assert [e.meta["title"] for e in general] == [t for t, _ in _articles()]
    specs["general"]["unit"] = "paragraph"
    assert len(load_hub_domains({"general": specs["general"]})) == 2 * N_ARTICLES
    specs["toxic"]["name"] = str(fixtures / "toxiGen.json")  # the export, by path, through the same loader
    assert [e.label for e in load_hub_domains({"toxic": specs["toxic"]})] == [e.label for e in toxic]

    for change, pattern in [({"loader": "imdb"}, r"config.data.hub.toxic.loader='imdb': expected one of"),
                            ({"name": ""}, r"config.data.hub.toxic.name is empty"),
                            ({"loader": "civil_comments"}, r"config.data.hub.toxic.config='annotated': the "
                                                           r"civil_comments loader takes no dataset config"),
                            ({"name": str(fixtures / "toxigen-data"), "split": "validation"},
                             r"config.data.hub.toxic \(toxigen\): could not load dataset .*split='validation'")]:
        with pytest.raises(UserInputError, match=pattern):
            load_hub_domains({"toxic": {**specs["toxic"], **change}})
    with pytest.raises(UserInputError, match="config.data.hub is empty"):
        load_hub_domains({})


def test_data_files_accept_the_toxigen_json_export(fixtures, tmp_path):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": " ".join(ps)}) + "\n" for _, ps in _articles()))
    c = llama.get_config()
    c.data.update({"source": "files", "files": f"toxic:{fixtures / 'toxiGen.json'}:label,general:{general}",
                   "tokenizer": str(fixtures / "llama"), "cache_dir": str(tmp_path / "cache"),
                   "num_prompts": {"toxic": 8, "general": 4}})
    corpus = build_corpus(c.data, seed=0)
    hateful = {_words(r["text"]) for r in _toxigen_rows() if r["toxicity_human"] > 3}
    assert len(corpus.prompts["toxic"]) == 8 and all(p.prompt in hateful for p in corpus.prompts["toxic"])
    toxic = corpus.train["toxic"] + corpus.valid["toxic"]
    by_text = {r["text"]: float(r["toxicity_human"] > 3) for r in _toxigen_rows()}
    assert all(by_text[e.text.replace("\n", " ").strip()] == e.label for e in toxic)
    assert not any("_x000D_" in e.text for e in toxic) and any("\n" in e.text for e in toxic)
    assert len(toxic) + 8 + sum(corpus.dropped["toxic"].values()) == N_TOXIC


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family, arg", [("llama", "llama3-8b,8xh100"), ("falcon", "falcon-7b")])
def test_paper_config_runs_end_to_end(fixtures, tmp_path, family, arg):
    """A few detox steps of the paper's config with every size shrunk by overrides: the stand-in model
    and tokenizer from model.path, the data from local copies in the HF layouts (Llama: ToxiGen's hub
    layout; Falcon: the toxiGen.json export), the RoBERTa oracle labeling the samples and judging."""
    toxic = fixtures / ("toxigen-data" if family == "llama" else "toxiGen.json")
    args = [sys.executable, "-m", "regft_jax.main", f"--config=configs/{family}.py:{arg}",
            f"--config.model.path={fixtures / family}", f"--config.data.tokenizer={fixtures / family}",
            f"--config.method.oracle_args.model_dir={fixtures / 'toxigen_roberta'}",
            f"--config.data.hub.toxic.name={toxic}", f"--config.data.hub.general.name={fixtures / 'wikitext'}",
            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=32",
            "--config.data.num_prompts.toxic=8", "--config.data.num_prompts.general=4",
            "--config.method.aux_layers=1", "--config.method.iterations=2", "--config.method.llm_steps=2",
            "--config.method.batch_size=8", "--config.method.samples_per_iteration=8",
            "--config.method.sample_batch_size=4", "--config.method.sample_tokens=6",
            "--config.eval.max_new_tokens=8", "--config.eval.batch_size=8", f"--workdir={tmp_path / 'run'}"]
    args += ["--config.mesh.fsdp=4"] if family == "llama" else []  # the 8xh100 mesh on 4 devices
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    judges = results.pop("judges")
    assert set(results) == {"base", "sft", "ours"} and judges["training_oracle"] == "hf_classifier"
    for r in results.values():
        assert set(r["toxicity"]) == {"hf_classifier", "insult_classifier"} and r["ppl_general"] > 1
        assert r["scored_hf_classifier_toxic"] == 8 and r["scored_insult_classifier_general"] == 4
    assert "hf_classifier (training oracle)" in out.stdout
    saved = json.loads((run / "config.json").read_text())
    assert (saved["eval"]["temperature"], saved["eval"]["top_p"], saved["model"]["dtype"]) == (0.1, 0.9, "bfloat16")

    # Every row of both fixtures reached the corpus through the hub loaders.
    summary = next(line for line in out.stdout.splitlines() if line.startswith("corpus: "))
    for domain, total in (("toxic", N_TOXIC), ("general", N_ARTICLES)):
        part = summary.split(f"{domain}: ")[1].split(";")[0]
        counts = [int(w) for w in part.replace("(", " ").split() if w.isdigit()]
        assert sum(counts) == total, part
    # Toxic eval prompts open hateful statements (labels from the human score / the export's label),
    # general ones open articles.
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    hateful = {_words(r["text"]) for r in _toxigen_rows() if r["toxicity_human"] > 3}
    openings = {_words(ps[0]) for _, ps in _articles()}
    for g in generations:
        assert g["prompt"] in (hateful if g["domain"] == "toxic" else openings), g
    assert len([g for g in generations if g["model"] == "ours"]) == 12
