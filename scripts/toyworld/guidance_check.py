"""What a trained edit does to the noise predictions, on the *base* model's trajectories.

    python scripts/toyworld/guidance_check.py RUN_DIR --concept star [--seeds 8]

With Δ = ε(c) − ε(∅) of the frozen UNet, the erase objective asks the edited UNet for
ε(∅) − η·Δ under the concept prompt ``c``. Along DDIM trajectories of the unedited model
(prompt "a photo of a CONCEPT", the model's guidance), this prints per timestep:

* ``|Δ|``: the RMS of the frozen guidance direction;
* ``edited(c) − target``: how far the edited conditional prediction is from the target
  (2|Δ| means no closer than the unedited UNet at η = 1);
* ``edited(∅) − ε(∅)``: how far the edit moves the unconditional prediction;
* ``kept``: the projection of the edited model's guidance direction on the frozen one
  (1 = unchanged, 0 = removed, −1 = reversed, as the objective asks).

RUN_DIR is anything ``receler generate --erasers`` loads (erasers or edited weights).
"""

from __future__ import annotations

import argparse
import sys

import torch


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def main() -> int:
    from receler.methods import edit_disabled, load_edit
    from receler.pipeline import (
        ddim_scheduler,
        default_model,
        encode,
        latent_shape,
        load_pipeline,
        unet_eps,
    )
    from receler.sampling import SamplerSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="folder of a trained edit")
    p.add_argument("--concept", required=True)
    p.add_argument("--model", default=None, help="default: the shipped toy model")
    p.add_argument("--seeds", type=int, default=8, help="trajectories")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = args.model or default_model()
    pipe = load_pipeline(model, device="cpu")
    load_edit(pipe, args.run)
    settings = SamplerSettings.for_model(model)
    sched = ddim_scheduler(pipe, settings.steps)
    n = args.seeds
    u, c, pc = (encode(pipe, [text]) for text in ("", args.concept, f"a photo of a {args.concept}"))
    u, c, pc = (x.with_hidden(x.hidden.expand(n, -1, -1)) for x in (u, c, pc))
    z = torch.randn((n, *latent_shape(pipe)), generator=torch.Generator().manual_seed(0))
    print(f"{'t':>4}  {'|Δ|':>7}  {'edited(c)−target':>16}  {'edited(∅)−ε(∅)':>15}  {'kept':>5}")
    with torch.no_grad():
        for t in sched.timesteps:
            with edit_disabled(pipe):
                e_u, e_c, e_pc = (unet_eps(pipe.unet, z, t, x) for x in (u, c, pc))
            d_u, d_c, d_pc = (unet_eps(pipe.unet, z, t, x) for x in (u, c, pc))
            delta, delta_pc = e_c - e_u, e_pc - e_u
            target = e_u - args.eta * delta
            kept = ((d_pc - d_u) * delta_pc).mean().item() / max(rms(delta_pc) ** 2, 1e-12)
            print(f"{int(t):>4}  {rms(delta):7.4f}  {rms(d_c - target):16.4f}  "
                  f"{rms(d_u - e_u):15.4f}  {kept:+5.2f}")
            z = sched.step(e_u + settings.guidance * delta_pc, t, z).prev_sample
    return 0


if __name__ == "__main__":
    sys.exit(main())
