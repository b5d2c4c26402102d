"""torch.compile vs eager for the decoder's training step: small and reference decoders, batch 64, bf16 / fp32.

One step = forward at the training mask ratio 0.9, loss, backward, AdamW step (what `train_decoder` runs per
batch; the function returning the loss is compiled, so the backward graph is too). Throughput over 6 s after 3
warm-up steps; the warm-up's seconds (compile time) are reported, because a 10-minute budget pays them.

    python benchmarks/bench_compile.py      # writes benchmarks/results/torch_compile_cpu.json
"""
import json
import os
import platform
import time
from pathlib import Path

import torch

from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.models.decoder_sizes import DECODER_SIZES
from dede_rt.scoring import reconstruction_loss
torch.manual_seed(0)
out = []
for size in ("small", "reference"):
    conf = DecoderConfig(embed_dim=512, image_size=32, patch_size=4, **DECODER_SIZES[size])
    for prec in ("bf16", "fp32"):
        for mode in ("eager", "compiled"):
            dec = DeDeDecoder(conf); opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
            x = torch.randn(64, 3, 32, 32); z = torch.randn(64, 512); g = torch.Generator().manual_seed(0)
            def loss_fn(x, z, g):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    pred, masked = dec(x, z, 0.9, g)
                return reconstruction_loss(pred.float(), patchify_images(x, 4), masked, 0.9)
            f = torch.compile(loss_fn) if mode == "compiled" else loss_fn
            t0 = time.perf_counter()
            for i in range(3):
                l = f(x, z, g); opt.zero_grad(); l.backward(); opt.step()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter(); n = 0
            while time.perf_counter() - t0 < 6:
                l = f(x, z, g); opt.zero_grad(); l.backward(); opt.step(); n += 1
            ips = 64 * n / (time.perf_counter() - t0)
            out.append({"decoder": size, "precision": prec, "mode": mode, "images_per_second": round(ips, 1), "warmup_seconds": round(warm, 1)})
            print(out[-1], flush=True)
path = Path(__file__).parent / "results" / "torch_compile_cpu.json"
path.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                        "torch": torch.__version__, "threads": torch.get_num_threads()},
                            "batch": 64, "rows": out}, indent=1) + "\n")
print(f"wrote {path}")
