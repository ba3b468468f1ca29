"""Rank program: the learner's logprobs of samples the embedded engine generated.

argv: OUT_DIR TP EP HF_DIR SAMPLES TEMPERATURE. SAMPLES is a torch file with a list of
(prompt_ids, response_ids). Rank 0 writes OUT_DIR/learner_logprobs.pt: one list of response
token logprobs per sample."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner, LossConfig, MicroBatch, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import load_hf_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout


def main(out_dir: str, tp: str, ep: str, hf_dir: str, samples_file: str, temperature: str) -> None:
    from megatron.core import parallel_state as ps

    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), ep=int(ep))
    init_parallel(layout, arch)
    learner = Learner(arch, layout, ModelOptions(), OptimizerConfig(), LossConfig(temperature=float(temperature)))
    load_hf_weights(learner.module, arch, hf_dir)
    samples = torch.load(samples_file)
    length = max(len(p) + len(r) for p, r in samples)
    tokens = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (prompt, response) in enumerate(samples):
        tokens[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
    zeros = torch.zeros(len(samples), length)
    batch = MicroBatch(tokens=tokens, response_mask=zeros.bool(), rollout_logprobs=zeros,
                       advantages=torch.zeros(len(samples)))
    logprobs = learner.logprobs([batch])
    if logprobs and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        per_sample = [logprobs[0][row, len(p) : len(p) + len(r)].tolist() for row, (p, r) in enumerate(samples)]
        torch.save(per_sample, Path(out_dir) / "learner_logprobs.pt")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
