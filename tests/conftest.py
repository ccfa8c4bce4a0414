import os
import sys
from pathlib import Path

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repo root


class StopAfter:
    """StopOnSigint stand-in: reports a Ctrl-C after `n` loop iterations (what a user's interrupt does)."""
    n = 2

    def __enter__(self):
        self.reads = 0
        return self

    def __exit__(self, *exc):
        return False

    @property
    def stop(self):
        self.reads += 1
        return self.reads > self.n


def write_meta_checkpoint(folder, scaled: bool, seed=0):
    """A small random Llama in Meta's original/ format: params.json, consolidated.00.pth, a 256-byte tokenizer.model."""
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": scaled}
    import base64, json
    import torch
    import hilt  # after TRITON_INTERPRET above
    torch.manual_seed(seed)
    model = hilt.Decoder(hilt.ModelArgs(**params, max_seq_len=64))
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # Meta ships bf16
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return params, sd
