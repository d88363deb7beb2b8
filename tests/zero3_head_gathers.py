"""Count the all-gathers of the student's output layer in fused micro-steps under ZeRO-3.

Run by tests/test_fused_models.py under `accelerate launch` (2 processes, ZeRO-3 with every
parameter partitioned): the real trainer's micro-step (``make_micro_step``) on a Phi student,
whose lm_head has a bias. Every gather of the layer carries the bias's partition, alone or
flattened with the weight's (a module's own fetch coalesces them, GatheredParameters sends
each apart), and no other message has either size: counting those counts the layer's gathers.
DeepSpeed's own communication logger counts the messages. Each rank writes its counts to
``rank<N>.json`` in the folder named by the first argument (one file a rank: two ranks
printing to one stdout can interleave their lines).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed.comm
import torch
from deepspeed.comm.comm import comms_logger
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from kd_dist.config import TrainConfig
from kd_dist.engine import accelerator_session, partitioned_loading
from kd_dist.models import forward_hidden
from kd_dist.teacher_signal import LiveTeacher
from kd_dist.trainer import make_micro_step

VOCAB, STEPS = 101, 2


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "phi", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def gathers(message_sizes: set[int]) -> int:
    """All-gathers so far whose message has one of these sizes (bytes)."""
    counts = comms_logger.comms_dict.get("all_gather_into_tensor", {})
    return sum(counts[size][0] for size in message_sizes if size in counts)


def main() -> None:
    cfg = TrainConfig(
        teacher_model="phi", student_model="phi", dataset="-", alpha=0.3,
        teacher_placement="replicate", batch_size=2, output_dir="/tmp/unused",
    )  # fmt: skip
    with accelerator_session(cfg) as accelerator:
        models = {}
        for role, seed in (("student", 0), ("teacher", 1)):  # built as the trainer loads them
            with partitioned_loading(accelerator, role, "replicate"):
                models[role] = build(seed)
        student, teacher = models["student"], models["teacher"].eval().requires_grad_(False)
        ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        loader = DataLoader([0, 1, 2, 3], batch_size=2)  # sizes DeepSpeed's micro-batch
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        student, optimizer, _ = accelerator.prepare(student, optimizer, loader)
        module = accelerator.unwrap_model(student)
        head = module.get_output_embeddings()
        bias, weight = (p.ds_tensor.numel() * p.ds_tensor.element_size()
                        for p in (head.bias, head.weight))  # fmt: skip
        head_messages = {bias, bias + weight}
        signal = LiveTeacher(teacher, "causal", fused=True)
        micro_step = make_micro_step(cfg, accelerator, student, signal, VOCAB, chunk_rows=8,
                                     fused=True)  # fmt: skip
        deepspeed.comm.configure(enabled=True, prof_all=True)
        counts = {"forward_hidden": [], "micro_step": []}
        for step in range(1, STEPS + 1):
            before = gathers(head_messages)
            with torch.no_grad():
                forward_hidden(student, module, batch, "causal")
            counts["forward_hidden"].append(gathers(head_messages) - before)
            before = gathers(head_messages)
            micro_step(batch, torch.tensor(4 * 8), 1.0, step)  # forwards, loss, backward, step
            counts["micro_step"].append(gathers(head_messages) - before)
        rank = accelerator.process_index
        (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **counts}))


if __name__ == "__main__":
    main()
