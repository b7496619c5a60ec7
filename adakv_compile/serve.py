"""Serving: continuous batching on one fixed-slot AdaKVCache, without recompiling, and calls checked first.

Why fixed slots: ``AdaKVCache.join`` / ``select_rows`` make new caches of new batch sizes; each batch size
(and each prompt length) was another compiled variant, and a serving loop reached Dynamo's recompile limit
(8), after which the frame ran eagerly and the cache's marker raised. Here the shapes are fixed up front
(docs/design.md, "Decision: serving shapes"):

- prefill: each request alone into one reused batch-1 cache, the sequence dimension marked dynamic
  (one compiled prefill graph for every prompt length >= 2);
- decode: one cache of ``max_batch`` rows for the server's life; a prefilled request is copied into a free
  row in place (``AdaKVCache.load_rows``), a finished one is freed in place (``free_rows``); every decode
  step runs all ``max_batch`` rows (free rows compute tokens nobody reads): one compiled decode graph and,
  on CUDA, one recorded CUDA graph.

``generate_alone`` decodes one request by itself (batch 1 on the prefill cache: one more decode graph)
to check that batching changes nothing.

``check_call`` is what ``compile_model`` runs before the compiled forward: a bad call raises
``RequestError`` naming the parameter in plain Python, so Dynamo never traces it and later calls run as if
it had never happened.
"""
from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .cache import AdaKVCache, RequestError, cache_kwarg
from .kernels.store import StoreError

# -- calls refused before tracing ----------------------------------------------------------------------------


def check_call(config, args: tuple, kwargs: dict) -> None:
    """Refuse, before Dynamo traces anything, a forward call the compiled graphs cannot serve."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    x = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    name = "input_ids" if isinstance(ids, torch.Tensor) else "inputs_embeds"
    if not isinstance(x, torch.Tensor):
        return
    if x.dim() < 2 or x.shape[1] == 0 or x.shape[0] == 0:
        raise RequestError(f"{name} of shape {tuple(x.shape)}: an empty prompt (a request needs at least one "
                           "token, [batch, tokens])")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, AdaKVCache):
        return
    B, t = int(x.shape[0]), int(x.shape[1])
    if cache.config.key() != config.key():
        raise RequestError("cache: this AdaKVCache was sized for another AdaKVConfig than the backend "
                           f"compresses with (cache: {cache.config}, backend: {config}); build it from the "
                           "backend: AdaKVCache(model, backend, ...)")
    rows = cache.batch_size
    if B != rows:
        raise RequestError(f"{name}: batch {B}, but the cache holds {rows} rows (AdaKVCache(batch_size={rows})); "
                           "give one row per cache row")
    for other in ("attention_mask", "position_ids"):
        m = kwargs.get(other)
        if isinstance(m, torch.Tensor) and m.dim() >= 2 and m.shape[0] not in (B, 1 if other == "position_ids" else B):
            raise RequestError(f"{other}: batch {m.shape[0]}, but {name} has {B} rows")
    if not cache.holds_prompt():  # a prefill
        if cache.max_prompt_len is not None and t > cache.max_prompt_len:
            raise RequestError(f"{name}: a prompt of {t} tokens, more than the cache holds "
                               f"(AdaKVCache(max_prompt_len={cache.max_prompt_len}))")
        return
    left = cache.room_left()
    if t > left:
        raise RequestError(f"{name}: {t} tokens do not fit: AdaKVCache(max_new_tokens={cache.max_new_tokens}) "
                           f"already holds a compressed prompt and has room for {left} more appended tokens "
                           f"({t} more do not fit). To prefill a new prompt, call cache.reset() first (or use a "
                           "new cache); to append more, size max_new_tokens larger")


class _RecompileLimitWatch(logging.Handler):
    """Remembers Dynamo's 'hit config.recompile_limit' warnings: after one, a frame runs eagerly."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record):
        if "hit config." in str(record.msg):
            try:
                self.hits.append(record.getMessage().splitlines()[0] + " for " +
                                 record.getMessage().splitlines()[1].strip())
            except Exception:  # noqa: BLE001  (never break logging)
                self.hits.append("torch._dynamo hit its recompile limit")


_WATCH = _RecompileLimitWatch()


def _watch_recompile_limit() -> None:
    lg = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCH not in lg.handlers:
        lg.addHandler(_WATCH)


def checked_forward(compiled, backend):
    """``compiled`` (a torch.compile'd forward) behind ``check_call``; a marker error from a frame Dynamo
    stopped compiling says so."""
    import functools

    from .kernels.static import _EAGER_MESSAGE

    _watch_recompile_limit()

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        check_call(backend.config, args, kwargs)
        try:
            return compiled(*args, **kwargs)
        except StoreError as e:
            if str(e) == _EAGER_MESSAGE and backend.graphs and _WATCH.hits:
                raise StoreError(
                    "adakv: the compiled forward fell back to eager, so the AdaKVCache's marker op ran "
                    f"uncompiled: {_WATCH.hits[-1]} (torch._dynamo.config.recompile_limit = "
                    f"{torch._dynamo.config.recompile_limit}) after {len(backend.graphs)} graphs were "
                    "compiled: every new batch size, prompt length or cache shape was another variant. Serve "
                    "with fixed shapes (adakv_compile.serve.Server: one prefill and one decode graph) or raise "
                    "the limit.") from e
            raise

    forward._torchdynamo_orig_callable = getattr(compiled, "_torchdynamo_orig_callable", compiled)
    forward._adakv_compiled = compiled
    return forward


# -- sampling --------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One generation request. ``prompt``: token ids, ``[n]`` or ``[1, n]``. ``temperature`` 0 = greedy;
    ``top_k`` 0 = off; ``top_p`` 1 = off; ``seed`` seeds this request's own generator (so its sampled tokens
    do not depend on what else runs). Generation stops at ``max_new_tokens`` or at an ``eos_token_id``
    (included in ``tokens``)."""
    prompt: torch.Tensor
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: Union[int, Sequence[int], None] = None
    id: object = None
    record_logits: bool = False  # keep each step's logits (float32, CPU) in ``logits`` (equality checks)
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    finish_reason: Optional[str] = None  # "eos" or "length"
    _gen: Optional[torch.Generator] = field(default=None, repr=False)
    _pos: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def check_request(req: Request, vocab_size: Optional[int], room: int) -> torch.Tensor:
    """The request's prompt as ``[1, n]`` int64; RequestError naming the parameter if anything is wrong."""
    if not isinstance(req, Request):
        raise TypeError(f"submit(request=...) needs a Request, got {type(req).__name__}")
    p = req.prompt
    if not isinstance(p, torch.Tensor) or p.dtype not in (torch.int64, torch.int32) or p.dim() not in (1, 2) \
            or (p.dim() == 2 and p.shape[0] != 1):
        raise RequestError(f"Request(prompt=...): token ids of shape [n] or [1, n], got "
                           f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    p = p.reshape(1, -1).long()
    if p.shape[1] == 0:
        raise RequestError("Request(prompt=...): an empty prompt (a request needs at least one token)")
    if vocab_size is not None and bool(((p < 0) | (p >= vocab_size)).any()):
        raise RequestError(f"Request(prompt=...): token ids outside the vocabulary [0, {vocab_size})")
    m = req.max_new_tokens
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= room + 1:
        raise RequestError(f"Request(max_new_tokens={m!r}): must be an integer in [1, {room + 1}] (the server's "
                           f"cache has room for {room} appended tokens per row)")
    if not isinstance(req.temperature, (int, float)) or not req.temperature >= 0:
        raise RequestError(f"Request(temperature={req.temperature!r}): must be a number >= 0 (0 = greedy)")
    if isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 0:
        raise RequestError(f"Request(top_k={req.top_k!r}): must be an integer >= 0 (0 = off)")
    if not isinstance(req.top_p, (int, float)) or not 0 < req.top_p <= 1:
        raise RequestError(f"Request(top_p={req.top_p!r}): must be a number in (0, 1] (1 = off)")
    if isinstance(req.seed, bool) or not isinstance(req.seed, int):
        raise RequestError(f"Request(seed={req.seed!r}): must be an integer")
    return p


def sample(logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
    """One token per row of ``logits`` [R, V], each by its request's settings and generator.

    Row-independent (sort, softmax, cumsum per row; one uniform per row from the request's own CPU
    generator, inverse-CDF), so a request samples the same tokens batched or alone given the same logits."""
    out = logits.float().argmax(-1)
    rand = [i for i, r in enumerate(reqs) if r.temperature > 0]
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        temp = torch.tensor([reqs[i].temperature for i in rand], device=logits.device)[:, None]
        vals, order = torch.sort(logits[idx].float() / temp, dim=-1, descending=True)
        probs = torch.softmax(vals, -1)
        V = probs.shape[-1]
        k = torch.tensor([reqs[i].top_k or V for i in rand], device=logits.device)[:, None]
        p = torch.tensor([float(reqs[i].top_p) for i in rand], device=logits.device)[:, None]
        rank = torch.arange(V, device=logits.device)[None]
        keep = (rank < k) & ((torch.cumsum(probs, -1) - probs) < p)  # always keeps the top token
        cdf = torch.cumsum(probs * keep, -1)
        u = torch.cat([torch.rand(1, generator=reqs[i]._gen, dtype=torch.float64) for i in rand])
        u = (u.to(logits.device)[:, None] * cdf[:, -1:].double()).to(cdf.dtype)
        pick = torch.searchsorted(cdf, u).clamp_(max=V - 1)
        out[idx] = order.gather(-1, pick)[:, 0]
    return out.tolist()


def _finish(req: Request, tok: int) -> None:
    req.tokens.append(tok)
    eos = req.eos_token_id
    if eos is not None and tok in ([eos] if isinstance(eos, int) else list(eos)):
        req.finish_reason = "eos"
    elif len(req.tokens) >= req.max_new_tokens:
        req.finish_reason = "length"


# -- the server ------------------------------------------------------------------------------------------------


class Server:
    """Continuous batching over one fixed-slot AdaKVCache (see the module docstring).

        backend = compile_model(model, AdaKVConfig(budget=1024))
        server = Server(model, backend, max_batch=16, max_new_tokens=256)
        server.submit(Request(prompt=ids, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1))
        done = server.run()            # or: while server.busy: done += server.step()

    max_batch: rows decoded together (``AdaKVCache.max_batch`` says how many fit). max_new_tokens: the most
    any request generates (the room each row gets). max_prompt_len: only for configs whose kept count
    depends on the prompt (compression_ratio, skip_layers).
    """

    def __init__(self, model, backend, max_batch: int, max_new_tokens: int,
                 max_prompt_len: Optional[int] = None, eos_token_id: Union[int, Sequence[int], None] = None):
        for name, value in (("max_batch", max_batch), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Server({name}={value!r}): must be an integer >= 1")
        self.model, self.backend = model, backend
        self.kw = cache_kwarg(model)
        fn = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
        self._keep_arg = "logits_to_keep" in inspect.signature(fn).parameters
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.eos_token_id = eos_token_id
        # room: a request of N tokens appends N - 1 (the last token is never fed back)
        self.cache = AdaKVCache(model, backend, batch_size=max_batch, max_new_tokens=max_new_tokens,
                                max_prompt_len=max_prompt_len)
        self.prefill_cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=max_new_tokens,
                                        max_prompt_len=max_prompt_len)
        self.cache.free_rows(range(max_batch))
        self.device = self.cache.layers[0].pool_k.device
        self.max_batch, self.room = max_batch, max_new_tokens
        self.slots: list[Optional[Request]] = [None] * max_batch
        self.queue: deque = deque()
        self.steps = 0          # decode steps run
        self.finished: list[Request] = []

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    def submit(self, request: Request) -> Request:
        """Queue a request (checked now: RequestError naming the parameter)."""
        request._prompt = check_request(request, self.vocab_size, self.room)
        if request.eos_token_id is None:
            request.eos_token_id = self.eos_token_id
        self.queue.append(request)
        return request

    def _prefill(self, req: Request, cache: AdaKVCache) -> None:
        """Prefill ``req`` alone into ``cache`` (reset first) and take its first token."""
        ids = req._prompt.to(self.device)
        torch._dynamo.maybe_mark_dynamic(ids, 1)  # one prefill graph for every prompt length
        cache.reset()
        extra = {"logits_to_keep": 1} if self._keep_arg else {}
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=True, **extra, **{self.kw: cache}).logits[:, -1]
        req._gen = torch.Generator().manual_seed(req.seed)
        req.tokens, req.logits, req.finish_reason = [], [], None
        req._pos = ids.shape[1]  # the position of the token fed next
        if req.record_logits:
            req.logits.append(logits[0].float().cpu())
        _finish(req, sample(logits, [req])[0])

    def step(self) -> list[Request]:
        """Admit queued requests into free rows (one prefill each), then one decode step of all rows.
        Returns the requests that finished during this step."""
        done = []
        for slot in range(self.max_batch):
            while self.slots[slot] is None and self.queue:
                req = self.queue.popleft()
                self._prefill(req, self.prefill_cache)
                if req.done:
                    done.append(req)
                    continue
                self.cache.load_rows([slot], self.prefill_cache)
                self.slots[slot] = req
        live = [(s, r) for s, r in enumerate(self.slots) if r is not None]
        if live:
            toks = [[r.tokens[-1] if r is not None else 0] for r in self.slots]
            pos = [[r._pos if r is not None else 0] for r in self.slots]
            ids = torch.tensor(toks, device=self.device)
            position = torch.tensor(pos, device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, position_ids=position, use_cache=True,
                                    **{self.kw: self.cache}).logits[:, -1]
            self.steps += 1
            rows = [s for s, _ in live]
            picked = sample(logits[rows] if len(rows) < self.max_batch else logits, [r for _, r in live])
            for (s, r), tok in zip(live, picked):
                if r.record_logits:
                    r.logits.append(logits[s].float().cpu())
                r._pos += 1
                _finish(r, tok)
                if r.done:
                    done.append(r)
                    self.slots[s] = None
            freed = [s for s, r in live if r.done]
            if freed:
                self.cache.free_rows(freed)
        self.finished.extend(done)
        return done

    def run(self, requests: Sequence[Request] = ()) -> list[Request]:
        """Submit ``requests`` and step until every request has finished; returns them in finishing order."""
        for r in requests:
            self.submit(r)
        out = []
        while self.busy:
            out.extend(self.step())
        return out

    def generate_alone(self, request: Request) -> Request:
        """The same request decoded by itself (batch 1, on the prefill cache, no slots): what batching must
        not change. Returns a finished copy; ``request`` itself is not touched. Call between steps."""
        req = Request(prompt=request.prompt, max_new_tokens=request.max_new_tokens,
                      temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                      eos_token_id=request.eos_token_id if request.eos_token_id is not None else self.eos_token_id,
                      id=request.id, record_logits=request.record_logits)
        req._prompt = check_request(req, self.vocab_size, self.room)
        self._prefill(req, self.prefill_cache)
        while not req.done:
            self._alone_step(req)
        return req

    def _alone_step(self, req: Request) -> None:
        # its own function: no graph output stays alive into the next call (CUDA graph trees replay then)
        ids = torch.tensor([[req.tokens[-1]]], device=self.device)
        position = torch.tensor([[req._pos]], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, position_ids=position, use_cache=True,
                                **{self.kw: self.prefill_cache}).logits[:, -1]
        if req.record_logits:
            req.logits.append(logits[0].float().cpu())
        req._pos += 1
        _finish(req, sample(logits, [req])[0])
