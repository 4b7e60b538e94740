"""An lm-evaluation-harness (0.4.x) model backend, registered as "regft_jax": any lm-eval task on the JAX model.

    pip install -e '.[eval]'
    python -m regft_jax.eval.harness --model regft_jax --model_args pretrained=DIR --tasks piqa,boolq --batch_size 32

`python -m regft_jax.eval.harness` is lm-eval's own command line (`lm_eval ...`, every flag) with this
backend registered. DIR: an HF Llama/Falcon directory (`config.json` + safetensors), a regft_jax model
checkpoint (`checkpoint.save_model`) or a model `python -m regft_jax.main --config.eval.save_models=True`
exported (`<workdir>/models/<name>`, `eval.export`); give `tokenizer=HF_TOKENIZER_DIR` unless DIR holds one.
Model args: pretrained, tokenizer, batch_size (default 32), max_length (default: the model's max_seq_len),
max_gen_toks (default 256), add_bos_token (default: the tokenizer's choice, like lm-eval's `hf` backend),
dtype (compute dtype, default the checkpoint's), mesh (default `data:-1`: every local device on the "data"
axis, the parameters replicated; `AXIS:SIZE[/AXIS:SIZE...]` over data, fsdp and tensor as `config.mesh`,
e.g. `fsdp:-1` shards the parameters too, `data:2/tensor:4`; without a -1, the first SIZE x ... local
devices). Every jitted batch is sharded over the data-parallel devices (data x fsdp) and padded to a
multiple of their number.

A guided model (NADO decoding: DIR/aux holds its auxiliary model R = σ(z_φ), `eval.export`) is the model
q = p · R, logits_q = logits + log σ(z_φ): `loglikelihood` and `loglikelihood_rolling` are log q
(`eval.perplexity.loglikelihoods` under the `AuxGuidance`; greedy = argmax of q) and `generate_until` samples
from q (the KV-cache sampler with the guidance), as `main` evaluates it.

Requests are scored exactly as lm-eval's `hf` backend tokenizes them (`TemplateLM`: the context's trailing
spaces move to the continuation, the pair is encoded whole and split; empty contexts get the BOS/EOS
prefix; contexts are left-truncated to max_length), then in jitted batches of similar lengths
(`eval.perplexity.loglikelihoods`, padded to `sampling.bucket` widths so few programs compile).
`generate_until` decodes with the KV-cache sampler (greedy unless the task asks for sampling) and cuts at
the first stop string.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Union

import numpy as np
import lm_eval.models  # noqa: F401  (lm-eval's own backends first: its registry loads them only while empty)
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from regft_jax.errors import UserInputError


MESH_HELP = ("AXIS:SIZE[/AXIS:SIZE...] with axes data, fsdp, tensor (one SIZE may be -1), e.g. data:-1 or "
             "data:2/tensor:4")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # any of them: a tokenizer


def local_mesh(spec: Union[str, Mapping[str, int]] = "data:-1"):
    """The mesh of model arg `mesh` (see the module docstring) on this process's devices: a -1 axis takes
    every remaining local device, else the first product-of-sizes local devices are used."""
    import jax

    from regft_jax import sharding

    shape = spec
    if not isinstance(spec, Mapping):
        try:
            shape = {axis: int(size) for axis, size in (part.split(":") for part in str(spec).split("/"))}
        except ValueError:
            raise UserInputError(f"regft_jax model_args mesh={spec!r}: expected {MESH_HELP}") from None
    devices = jax.local_devices()
    if -1 not in shape.values():
        devices = devices[:math.prod(shape.values())]
    try:
        return sharding.make_mesh(dict(shape), devices)
    except UserInputError as e:
        raise UserInputError(f"regft_jax model_args mesh={spec!r}: {e} (local devices: {len(jax.local_devices())})") \
            from None


def _bool(value) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("regft_jax")
class RegftLM(TemplateLM):
    """lm-eval's model interface on a regft_jax model (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(self, pretrained: str, tokenizer: Optional[str] = None, batch_size=32, max_length=None,
                 max_gen_toks: int = 256, add_bos_token=None, dtype: Optional[str] = None, mesh="data:-1",
                 **unused):
        super().__init__()
        import transformers

        from regft_jax.eval.export import load_model_dir

        if not os.path.isdir(pretrained):
            raise UserInputError(f"regft_jax model_args pretrained={pretrained!r}: no such directory")
        if tokenizer is None and not any(os.path.isfile(os.path.join(pretrained, f)) for f in TOKENIZER_MARKERS):
            raise UserInputError(f"regft_jax model_args pretrained={pretrained!r} holds no tokenizer "
                                 f"({', '.join(TOKENIZER_MARKERS)}): give tokenizer=HF_TOKENIZER_DIR")
        self.mesh = local_mesh(mesh)
        self.cfg, self.params, self.guidance, self.guidance_params = load_model_dir(
            pretrained, mesh=self.mesh, **({"dtype": dtype} if dtype else {}))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or pretrained)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> 32
        self._max_length = int(max_length) if max_length else self.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)

    # -- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode(self.prefix_token_id)
            if add_special_tokens is None and bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring

    def _pair(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The pair cut to max_length tokens from the left (the continuation kept whole)."""
        if len(continuation) >= self.max_length:
            raise UserInputError(f"regft_jax: a continuation of {len(continuation)} tokens does not fit max_length "
                                 f"{self.max_length} with any context")
        whole = (list(context) + list(continuation))[-(self.max_length + 1):]
        return whole[:len(whole) - len(continuation)], list(continuation)

    def _scores(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False):
        from regft_jax.eval.perplexity import loglikelihoods

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        logl, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
        chunk = 64 * self.batch_size  # progress in chunks; each chunk is scored in length-sorted batches
        for start in tqdm(range(0, len(pairs), chunk), disable=disable_tqdm or len(pairs) <= chunk,
                          desc="regft_jax loglikelihoods"):
            part = pairs[start:start + chunk]
            logl[start:start + len(part)], greedy[start:start + len(part)] = loglikelihoods(
                self.cfg, self.params, part, guidance=self.guidance, guidance_params=self.guidance_params,
                batch_size=self.batch_size, mesh=self.mesh, pad_id=pad)
        return logl, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        logl, greedy = self._scores([self._pair(c, y) for _, c, y in requests], disable_tqdm)
        out = []
        for (key, _, _), lp, g in zip(requests, logl, greedy):
            out.append((float(lp), bool(g)))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, scored in disjoint windows of max_length tokens (lm-eval's own
        rolling-window split, as its `hf` backend)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(context), list(continuation)))
                owner.append(i)
        logl, _ = self._scores(windows, disable_tqdm)
        totals = np.bincount(np.asarray(owner, int), weights=logl, minlength=len(requests))
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded until a stop string (`until`, and the EOS text) or max_gen_toks tokens."""
        from regft_jax import sampling

        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for idx in tqdm(groups.values(), disable=disable_tqdm, desc="regft_jax generate_until"):
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until += [eos] if eos and eos not in until else []
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            if n >= self.max_length:
                raise UserInputError(f"regft_jax: max_gen_toks {n} leaves no room for a context in max_length "
                                     f"{self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - n) or
                       [self.prefix_token_id] for i in idx]
            ids = sampling.generate(self.cfg, self.params, prompts, max_new_tokens=n, temperature=temperature,
                                    top_p=float(kw.get("top_p", 1.0) or 1.0), eos_id=self.eot_token_id,
                                    pad_id=self.tokenizer.pad_token_id or 0, batch_size=self.batch_size,
                                    mesh=self.mesh, guidance=self.guidance, guidance_params=self.guidance_params)
            for i, text in zip(idx, self.tokenizer.batch_decode(ids, skip_special_tokens=False)):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv=None) -> None:
    """lm-eval's command line with the regft_jax backend registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
