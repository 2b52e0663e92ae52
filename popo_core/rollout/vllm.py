"""Rollouts with vLLM (GPU): the same interface as the HF engine, much faster generation.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so new policy weights are pushed
into it in memory after every rollout step (`sync_weights`), and the prefix cache is reset so
cached prefixes never give log-probs of old weights (PITFALLS.md). Its log-probs are only
compared with the trainer's; the trainer recomputes pi_old itself (METHOD.md, Setting).
"""

from __future__ import annotations

import os
from typing import Sequence

from popo_core.errors import ConfigError
from popo_core.rollout import Rollouts, cut_at_eos, eos_ids, suppressed_ids


class VLLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(
                "rollout.engine=vllm: vLLM is not installed (pip install 'popo[vllm]' on a GPU machine)"
            ) from None
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.suppress = suppressed_ids(tokenizer, self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(
            model=model.config._name_or_path,
            tokenizer=model.config._name_or_path,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            # Log-probs after temperature: the distribution the sampler drew from.
            logprobs_mode="processed_logprobs",
        )
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Load the policy's current weights into the engine, in memory."""
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
    ) -> Rollouts:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            top_k=-1,
            max_tokens=max_new_tokens,
            stop_token_ids=sorted(self.eos),
            logprobs=0,  # the sampled token's own log-prob
            logit_bias={i: -100.0 for i in self.suppress} or None,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        return rollouts_from_vllm(prompt_ids, outputs, self.eos, self.tokenizer)


def rollouts_from_vllm(prompt_ids, outputs, eos: set[int], tokenizer) -> Rollouts:
    """Flatten vLLM RequestOutputs (one per prompt, `n` completions each) into Rollouts."""
    prompts, completions, groups, truncated, logprobs = [], [], [], [], []
    for g, (prompt, request) in enumerate(zip(prompt_ids, outputs)):
        for completion in request.outputs:
            tokens, cut = cut_at_eos(completion.token_ids, eos)
            prompts.append(list(prompt))
            completions.append(tokens)
            groups.append(g)
            truncated.append(cut or completion.finish_reason == "length")
            chosen = completion.logprobs or []
            logprobs.append([float(step[tok].logprob) for step, tok in zip(chosen, tokens)])
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(prompts, completions, texts, groups, truncated, logprobs)
