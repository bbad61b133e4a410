"""A naive multi-adapter Triton model: transformers + PEFT, one request at a time.

What a user would write without multilora, kept plain on purpose (it is the baseline that
bench/serving/served_throughput.py measures lora_llm against): the base model and every adapter
found in `adapter_dir` are loaded into one PeftModel at start; each request selects its adapter
with `set_adapter` (or runs with adapters disabled for the base model) and calls `generate`.
"""
import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value.item()


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
        base = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
        adapter_dir = Path(params["adapter_dir"])
        names = sorted(p.name for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
        self.model = PeftModel.from_pretrained(base, adapter_dir / names[0], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapter_dir / name, adapter_name=name)
        self.model.eval()

    def execute(self, requests):
        return [self._generate(request) for request in requests]

    def _generate(self, request):
        prompt = _scalar(request, "text_input", "")
        adapter = _scalar(request, "adapter_id", "")
        max_tokens = int(_scalar(request, "max_tokens", 16))
        inputs = self.tokenizer(prompt, return_tensors="pt")
        options = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        if _scalar(request, "ignore_eos", False):
            options["min_new_tokens"] = max_tokens
        with torch.no_grad():
            if adapter:
                self.model.set_adapter(adapter)
                output = self.model.generate(**inputs, **options)
            else:
                with self.model.disable_adapter():
                    output = self.model.generate(**inputs, **options)
        new_ids = output[0, inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("completion_tokens", np.array([[len(new_ids)]], dtype=np.int32)),
        ])
