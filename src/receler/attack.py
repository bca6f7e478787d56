"""Attacks that try to bring an erased concept back, for robustness beyond paraphrases.

Both attacks use the objective of UnlearnDiffAtk: images of the concept are generated
by the *base* model (erasers or edits off), noised at random timesteps, and the attacked
model must predict the added noise when prompted with ``prompt ⊕ attack``. A model that
has really forgotten the concept cannot denoise its images, whatever the prompt.

* :func:`soft_prompt_attack` (white-box): K continuous tokens after the prompt's tokens,
  optimised by gradient descent. In the ``"output"`` space (the default) they are written
  into the text encoder's output, the UNet's conditioning; in the ``"input"`` space (where
  UnlearnDiffAtk optimises) they are word embeddings that the text encoder runs on, so an
  erasure that edits the encoder (AdvUnlearn) is attacked through its edit. The output
  space bypasses the encoder, which makes it the stronger attack on UNet-side erasures and
  no test at all of an encoder-side one.
* :func:`discrete_token_attack`: K vocabulary tokens appended to the prompt text, chosen
  position by position by a search over candidate tokens on the same loss.

Success is then measured by generating with the attacked prompt and running a detector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import SPACES
from .objective import insert_soft_tokens
from .pipeline import Conditioning, encode, latent_shape, unet_eps


@dataclass
class AttackConfig:
    """Settings shared by both attacks."""

    tokens: int = 8  # attack tokens (soft embeddings or vocabulary words)
    steps: int = 100  # optimisation steps of the soft tokens
    lr: float = 1e-2  # Adam learning rate of the soft tokens
    sweeps: int = 2  # discrete: passes over all positions
    target_images: int = 4  # base-model images of the concept used as targets
    noise_draws: int = 4  # (image, t, ε) draws per loss evaluation
    candidates: int = 64  # vocabulary tokens tried per position (discrete)
    seed: int = 0
    space: str = "output"  # soft tokens in the text encoder's output or input (SPACES)

    def __post_init__(self):
        for name in ("tokens", "steps", "sweeps", "target_images", "noise_draws", "candidates"):
            if getattr(self, name) <= 0:
                raise ValueError(f"attack {name} must be positive, got {getattr(self, name)}")
        if self.space not in SPACES:
            raise ValueError(f"attack space must be one of {', '.join(SPACES)}, got "
                             f"{self.space!r}")

    def key(self) -> dict:
        """The settings as a dict for cache keys and ``results.json``: ``space`` only when
        it is not ``"output"``, so that keys written before the field existed still match."""
        out = asdict(self)
        if out["space"] == "output":
            del out["space"]
        return out


@torch.no_grad()
def target_latents(pipe, concept_prompt: str, n: int, *, steps: int, guidance: float,
                   base: Callable[[], AbstractContextManager] = nullcontext, seed: int = 0
                   ) -> torch.Tensor:
    """``n`` clean latents of the concept, sampled by the base model (``base()`` context)."""
    c, h, w = latent_shape(pipe)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((n, c, h, w), generator=g).to(pipe.unet.device, pipe.unet.dtype)
    with base():
        out = pipe([concept_prompt] * n, num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents, output_type="latent")
    return out.images  # (n, C, H, W), VAE-scaled latents


class DenoisingLoss:
    """UnlearnDiffAtk's loss: ‖ε_model(z_t, t, cond) − ε‖² on noised target latents."""

    def __init__(self, pipe, latents: torch.Tensor, draws: int, seed: int):
        self.pipe, self.latents, self.draws = pipe, latents, draws
        self.g = torch.Generator("cpu").manual_seed(seed)
        self.T = pipe.scheduler.config.num_train_timesteps

    def sample(self):
        """A fresh batch of (z_t, t, ε)."""
        idx = torch.randint(len(self.latents), (self.draws,), generator=self.g)
        t = torch.randint(self.T, (self.draws,), generator=self.g)
        eps = torch.randn((self.draws, *self.latents.shape[1:]), generator=self.g)
        dev, dt = self.latents.device, self.latents.dtype
        eps, t = eps.to(dev, dt), t.to(dev)
        z = self.pipe.scheduler.add_noise(self.latents[idx.to(dev)], eps, t)
        return z, t, eps

    def __call__(self, cond: Conditioning, batch=None) -> torch.Tensor:
        z, t, eps = batch if batch is not None else self.sample()
        hidden = cond.hidden.expand(len(z), -1, -1)
        return F.mse_loss(unet_eps(self.pipe.unet, z, t, cond.with_hidden(hidden)).float(),
                          eps.float())

    @torch.no_grad()
    def many(self, cond: Conditioning, batch, max_batch: int = 64) -> torch.Tensor:
        """The loss of each of ``cond``'s ``P`` prompts on the same draws, batched: ``(P,)``."""
        z, t, eps = batch
        n, losses = len(z), []
        step = max(1, max_batch // n)  # prompts per UNet call
        for i in range(0, len(cond.hidden), step):
            hidden = cond.hidden[i:i + step]  # (p, T, D)
            p = len(hidden)
            rep = Conditioning(hidden.repeat_interleave(n, 0))  # (p·n, T, D), prompt-major
            out = unet_eps(self.pipe.unet, z.repeat(p, 1, 1, 1), t.repeat(p), rep).float()
            err = (out - eps.float().repeat(p, 1, 1, 1)).pow(2).flatten(1).mean(1)  # (p·n,)
            losses.append(err.view(p, n).mean(1))
        return torch.cat(losses)


def soft_prompt_attack(pipe, prompt: str, latents: torch.Tensor, config: AttackConfig, *,
                       show_progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Optimise ``config.tokens`` soft tokens after ``prompt``'s tokens, in ``config.space``.

    Returns:
        The attacked prompt embedding ``(1, T, D)`` and the loss per step.
    """
    hidden, losses = soft_attack_trajectory(pipe, prompt, latents, config, [config.steps],
                                            show_progress=show_progress)
    return hidden[config.steps], losses


def soft_attack_trajectory(pipe, prompt: str, latents: torch.Tensor, config: AttackConfig,
                           checkpoints: list[int], *, show_progress: bool = False
                           ) -> tuple[dict[int, torch.Tensor], list[float]]:
    """One soft-prompt attack run to ``max(checkpoints)`` steps (``config.steps`` is not
    read), keeping the attacked embedding after each checkpoint's number of steps.

    Adam has no schedule, so the embedding after ``s`` steps of a longer run is the one a
    run of ``s`` steps would return: one run measures every budget of a curve. Step 0 is the
    prompt itself (the soft tokens start as the hidden states or word embeddings they
    replace, by ``config.space``).

    Returns:
        ``{steps: attacked prompt embedding (1, T, D)}`` and the loss per step.
    """
    if not checkpoints or min(checkpoints) < 0:
        raise ValueError(f"checkpoints must be attack step counts >= 0, got {checkpoints}")
    sp = soft_prompt(pipe, prompt, config.tokens, space=config.space)
    soft = sp.init.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=config.lr)
    loss_fn = DenoisingLoss(pipe, latents, config.noise_draws, config.seed)
    losses, kept = [], {}

    def keep(step: int) -> None:
        if step in checkpoints:
            with torch.no_grad():
                kept[step] = sp.embed(soft)

    keep(0)
    for step in tqdm(range(1, max(checkpoints) + 1), desc="soft attack",
                     disable=not show_progress):
        loss = loss_fn(sp.cond.with_hidden(sp.embed(soft)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        keep(step)
    return kept, losses


@dataclass
class SoftPrompt:
    """A prompt's embedding as a function of ``K`` soft tokens placed after its tokens."""

    cond: Conditioning  # the prompt's own conditioning (what the attack starts from)
    start: int  # first soft position: the prompt's end token, then its padding
    init: torch.Tensor  # (K, D) what the soft tokens replace: hidden states or word embeddings
    embed: Callable[[torch.Tensor], torch.Tensor]  # (K, D) soft tokens -> (1, T, D) embedding


def soft_prompt(pipe, prompt: str, tokens: int, *, space: str = "output") -> SoftPrompt:
    """The soft-prompt attack's parametrisation of ``prompt`` in ``space`` (:data:`SPACES`).

    ``"output"``: the soft tokens replace positions ``start … start+K−1`` of the encoded
    prompt, the UNet's conditioning. ``"input"``: they replace the word embeddings at those
    positions, and the text encoder (edited or not) runs on them; its output is the
    embedding, with gradients back to the soft tokens. Either way the prompt's end and
    padding tokens are what is replaced, and step 0 (``embed(init)``) is the prompt itself.
    """
    check_attack_space(pipe, space)
    cond = encode(pipe, [prompt])
    start = len(pipe.tokenizer(prompt)["input_ids"]) - 1  # replace EOS and padding
    if start + tokens > cond.hidden.shape[1]:
        raise ValueError(f"{tokens} attack tokens do not fit after {prompt!r} in "
                         f"{cond.hidden.shape[1]} positions: use fewer tokens")
    if space == "output":
        return SoftPrompt(cond, start, cond.hidden[0, start:start + tokens],
                          lambda soft: insert_soft_tokens(cond.hidden, soft, start))
    te, tok = pipe.text_encoder, pipe.tokenizer
    inputs = tok([prompt], padding="max_length", max_length=tok.model_max_length,
                 truncation=True, return_tensors="pt")  # as the pipeline's encode_prompt
    ids = inputs.input_ids.to(te.device)  # (1, T)
    mask = inputs.attention_mask.to(te.device) \
        if getattr(te.config, "use_attention_mask", False) else None
    with torch.no_grad():
        words = te.get_input_embeddings()(ids)  # (1, T, D_word)

    def embed(soft: torch.Tensor) -> torch.Tensor:
        return text_encoder_hidden(te, ids, soft=soft, start=start,
                                   attention_mask=mask).to(cond.hidden.dtype)

    return SoftPrompt(cond, start, words[0, start:start + tokens], embed)


def check_attack_space(pipe, space: str) -> None:
    """Refuse an attack space the pipeline cannot take, before an attack starts."""
    if space not in SPACES:
        raise ValueError(f"attack space must be one of {', '.join(SPACES)}, got {space!r}")
    if space == "input" and getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("the input-space soft attack runs one CLIP text encoder; this "
                         "pipeline has two (SDXL-style): use the output space")
    if space == "input" and getattr(pipe, "text_encoder", None) is None:
        raise ValueError("the input-space soft attack needs the pipeline's text encoder; "
                         "this pipeline has none: use the output space")


@contextmanager
def token_embeddings_replaced(text_encoder: torch.nn.Module, soft: torch.Tensor,
                              start: int) -> Iterator[None]:
    """Positions ``start … start+K−1`` of the token (word) embeddings become ``soft``
    ``(K, D)`` during the block; the position embeddings are still added after it.

    A forward hook on the encoder's input embeddings, removed in ``finally``: it works with
    every version of transformers' CLIP text model, whether or not it takes
    ``inputs_embeds``, and the rest of the encoder runs unchanged.
    """
    def hook(module, args, out):  # out: (B, T, D)
        k = soft.shape[0]
        s = soft.to(out.dtype).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :start], s, out[:, start + k:]], 1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def text_encoder_hidden(text_encoder: torch.nn.Module, ids: torch.Tensor, *,
                        soft: torch.Tensor | None = None, start: int = 1,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's last hidden state ``(B, T, D)`` of ``ids``, with gradients (the
    pipeline's prompt embedding); with ``soft`` ``(K, D)``, the word embeddings at positions
    ``start …`` are the soft tokens (:func:`token_embeddings_replaced`)."""
    if soft is None:
        return text_encoder(ids, attention_mask=attention_mask)[0]
    with token_embeddings_replaced(text_encoder, soft, start):
        return text_encoder(ids, attention_mask=attention_mask)[0]


@torch.no_grad()
def discrete_token_attack(pipe, prompt: str, latents: torch.Tensor, config: AttackConfig, *,
                          vocabulary: list[str] | None = None, show_progress: bool = False
                          ) -> tuple[str, list[float]]:
    """Append ``config.tokens`` vocabulary words to ``prompt``, chosen greedily.

    Each sweep visits every position and tries ``config.candidates`` words there (all of a
    small vocabulary, a random sample of a large one), keeping the one with the lowest
    denoising loss on a fixed batch of noised target latents.

    Returns:
        The attacked prompt text, and the loss of the random start followed by the best
        loss after each position update.
    """
    vocab = vocabulary or _word_vocabulary(pipe.tokenizer)
    g = torch.Generator("cpu").manual_seed(config.seed)
    loss_fn = DenoisingLoss(pipe, latents, config.noise_draws, config.seed)
    batch = loss_fn.sample()  # fixed, so that candidates are compared fairly
    words = [vocab[int(i)] for i in torch.randint(len(vocab), (config.tokens,), generator=g)]

    def scores(trials: list[list[str]]) -> torch.Tensor:
        return loss_fn.many(encode(pipe, [" ".join([prompt, *ws]) for ws in trials]), batch)

    best = scores([words])[0].item()
    history = [best]
    bar = tqdm(total=config.sweeps * config.tokens, desc="token attack",
               disable=not show_progress)
    for _ in range(config.sweeps):
        for pos in range(config.tokens):
            pick = torch.randperm(len(vocab), generator=g)[:config.candidates].tolist()
            trials = [words[:pos] + [vocab[i]] + words[pos + 1:] for i in pick]
            losses = scores(trials)
            i = int(losses.argmin())
            if losses[i].item() < best:
                best, words = losses[i].item(), trials[i]
            history.append(best)
            bar.update(1)
    bar.close()
    return " ".join([prompt, *words]), history


@torch.no_grad()
def generate_from_embedding(pipe, hidden: torch.Tensor, seeds: list[int], settings
                            ) -> list:
    """Images for a prompt *embedding* (the soft attack's output), one per seed."""
    from .sampling import image_size, seeded_latents

    h, w = image_size(pipe, settings)
    latents = seeded_latents(pipe, seeds, h, w)
    n = len(seeds)
    return pipe(prompt_embeds=hidden.expand(n, -1, -1),
                negative_prompt_embeds=encode(pipe, [""]).hidden.expand(n, -1, -1),
                num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                height=h, width=w, latents=latents, output_type="pil").images


def _word_vocabulary(tokenizer) -> list[str]:
    """Whole-word tokens of a CLIP tokenizer (``word</w>``): lower-case ASCII words of two
    letters or more (CLIP lower-cases prompts, so capitals and single letters add nothing)."""
    words = [t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>")]
    return sorted(w for w in words if len(w) > 1 and w.isascii() and w.isalpha() and w.islower())
