"""GPU-only paths (skipped without CUDA): the compiled loss chunk, head_dim padding under cuDNN/flash, the
sync-free training step, document attention through flex attention, FP8 training on FP8 tensor cores, and the
CUDA-graph decode step. Run on a GPU machine: `python -m pytest tests/test_gpu.py` (`-o addopts=""` where
pytest-xdist is not installed, as benchmarks/gpu_suite.sh does)."""

import copy
from contextlib import contextmanager

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.run_config import RunConfig
from argonne.inference.engine import Engine, EngineRequest, EngineSettings
from argonne.inference.sampling import NonFiniteLogits, SamplingParams
from argonne.loss_argonne import accumulate_matmul, cross_entropy_chunk
from argonne.modeling_argonne import attention
from argonne.optim import build_optimizer
from argonne.parallel import Topology, parallelize
from argonne.training.build import cross_entropy_objective
from argonne.training.loop import training_step

from .inference.test_runner import IdTokenizer, prompts_of
from .test_model import LLAMA_STYLE, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def host_synchronisation_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_loss_chunk_matches_eager():
    from argonne.loss_argonne import _compiled_chunk_loss

    torch.manual_seed(0)
    logits = torch.randn(300, 5000, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 5000, (300,), device="cuda")
    targets[:20] = -100
    scale = torch.tensor(1 / 280, device="cuda")
    eager_loss, eager_grad = cross_entropy_chunk(logits, targets, scale, True)
    loss, grad = _compiled_chunk_loss(logits, targets, scale, True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch.ops.aten.addmm, "dtype_out"),
                    reason="this PyTorch has no addmm out_dtype, so accumulate_matmul adds a bf16 product instead "
                           "(the path the CPU tests cover)")
def test_float32_accumulating_matmul_equals_adding_the_product():
    torch.manual_seed(0)
    a = torch.randn(3000, 700, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(700, 900, device="cuda", dtype=torch.bfloat16)
    start = torch.randn(3000, 900, device="cuda")
    total = start.clone()
    accumulate_matmul(total, a, b)
    reference = start.double() + a.double() @ b.double()
    assert (total.double() - reference).norm() / reference.norm() < 1e-5  # float32 accumulation, no bf16 product


def test_padded_head_dim_attention_matches_in_bfloat16():
    """Padding to 176 (cuDNN) and the plain 170 (flash) are equally close to a float32 reference."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 256, 170, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 256, 170, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 256, 170, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def output_and_grads(q, k, v, pad_to):
        y = attention(q, k, v, None, pad_to)
        return (y.float(), *(g.float() for g in torch.autograd.grad(y.float().square().sum(), (q, k, v))))

    reference = output_and_grads(*(t.detach().float().requires_grad_() for t in (q, k, v)), 1)
    for plain, padded, exact in zip(output_and_grads(q, k, v, 1), output_and_grads(q, k, v, 8), reference):
        plain_error, padded_error = ((t - exact).norm() / exact.norm() for t in (plain, padded))
        assert padded_error < 1e-2 and padded_error < 2 * plain_error + 1e-3, (padded_error, plain_error)


@pytest.mark.parametrize("compile,optimizer", [(False, "adamw"), (True, "adamw"), (False, "muon")])
def test_training_step_never_waits_for_the_gpu(compile, optimizer):
    """Muon too: its skip of a non-finite step is a mask on the device, like fused AdamW's."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=2)).to(device)
    parallelize(model, Topology(), "selective", compile, None)
    run = RunConfig()
    run.optim.optimizer = optimizer
    optimizer = build_optimizer(model, run.optim)
    batch = torch.randint(0, 8192, (4, 129), device=device)

    def step():
        return training_step(model, optimizer, lambda: batch, cross_entropy_objective,
                             lambda: torch.autocast("cuda", dtype=torch.bfloat16), run, Topology(), device)

    first = step()[0].item()
    step()  # compiled graphs and optimizer state are made in the first steps
    with host_synchronisation_is_an_error():
        losses = [step()[0] for _ in range(3)]
    assert torch.stack(losses).isfinite().all() and losses[-1].item() < first


@pytest.mark.parametrize("compile", [False, True])
def test_document_attention_through_flex_attention_equals_the_cpu_boolean_mask(compile):
    """On a GPU document attention runs flex attention with a BlockMask (inside compiled blocks with compile);
    its loss and gradients equal the CPU path's boolean mask, float32."""
    torch.manual_seed(0)
    tokens = torch.randint(1, 320, (2, 300))
    tokens[torch.rand(tokens.shape) < 0.02] = 0  # documents of ~50 tokens, closed by token 0
    shape = {**LLAMA_STYLE, "max_position_embeddings": 512}
    reference = make_model("tiny", **shape, attention_scope="document", eos_token_id=0).train()
    model = copy.deepcopy(reference).cuda()
    parallelize(model, Topology(), "none", compile, None)
    results = []
    for net, device in ((reference, "cpu"), (model, "cuda")):
        loss = net(tokens[:, :-1].to(device), targets=tokens[:, 1:].to(device), use_cache=False).loss
        loss.backward()
        results.append((loss.cpu(), {n: p.grad.cpu() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 matmuls need compute capability 8.9+")
@pytest.mark.parametrize("recipe,compile", [("tensorwise", False), ("rowwise", False), ("tensorwise", True)])
def test_float8_on_fp8_tensor_cores_stays_near_bf16_and_never_waits(recipe, compile):
    """Real FP8 matmuls (torch._scaled_mm, not the CPU's emulation): the first step's loss within 1% of bf16's on
    the same weights and batch, gradients close, and the training step still never waits for the GPU."""
    from argonne.parallel import Float8Plan

    device = torch.device("cuda")
    torch.manual_seed(0)
    reference = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=2)).to(device)
    model = copy.deepcopy(reference)
    plan = Float8Plan.for_device(recipe, [], device, torch.bfloat16)
    assert not plan.emulate
    parallelize(reference, Topology(), "selective", compile, None)
    parallelize(model, Topology(), "selective", compile, None, plan)
    batch = torch.randint(0, 8192, (4, 129), device=device)
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    losses = []
    for net in (reference, model):
        with amp():
            loss = net(batch[:, :-1], targets=batch[:, 1:]).loss
        loss.backward()
        losses.append(loss.float())
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0]
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten().float(), q.grad.flatten().float(), dim=0)
        assert cosine > 0.95, (name, cosine.item())
    run = RunConfig()
    optimizer = build_optimizer(model, run.optim)

    def step():
        return training_step(model, optimizer, lambda: batch, cross_entropy_objective, amp, run, Topology(), device)

    first = step()[0].item()
    step()
    with host_synchronisation_is_an_error():
        later = [step()[0] for _ in range(3)]
    assert torch.stack(later).isfinite().all() and later[-1].item() < first


def greedy_ids(engine: Engine, prompts, params: SamplingParams) -> list[list[int]]:
    return [completion.token_ids for completion in engine.complete(prompts, params)]


def test_cuda_graph_decode_equals_eager_decode():
    model = make_model(**{**LLAMA_STYLE, "max_position_embeddings": 96}).cuda()
    prompts = prompts_of([5, 9, 2])
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    eager = greedy_ids(Engine(copy.deepcopy(model), IdTokenizer(), compile=False), prompts, params)
    graphed = Engine(model, IdTokenizer(), compile=True)
    assert graphed.runner.graphs
    assert greedy_ids(graphed, prompts, params) == eager
    assert greedy_ids(graphed, prompts, params) == eager  # replayed graphs, cache reused
    # Sampled tokens are drawn on the host side of the step from the logits the graph leaves (top-k 1 samples the
    # greedy token); streamed text is each row's tokens as they are made.
    assert greedy_ids(graphed, prompts, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=1)) == eager
    streamed = [[] for _ in prompts]
    handles = graphed.submit([EngineRequest(prompt, params, sink=lambda update, row=row: streamed[row].append(
        update.text)) for row, prompt in enumerate(prompts)])
    while not all(handle.completion for handle in handles):
        graphed.step()
    assert ["".join(pieces) for pieces in streamed] == [IdTokenizer().decode(ours) for ours in eager]


def test_engine_cuda_graphs_per_bucket_equal_the_eager_engine():
    model = make_model(**{**LLAMA_STYLE, "max_position_embeddings": 96}).cuda()
    prompts = prompts_of([5, 9, 2, 30, 1])
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (24, 7, 15, 3, 20)]
    settings = EngineSettings(max_batch=8, prefill_chunk=8)
    eager = Engine(copy.deepcopy(model), IdTokenizer(), settings, compile=False, kernels="torch")
    expected = [eager.complete([p], q)[0] for p, q in zip(prompts, params)]
    graphed = Engine(copy.deepcopy(model), IdTokenizer(), settings, kernels="torch")
    assert graphed.runner.graphs
    handles = graphed.submit([EngineRequest(p, q) for p, q in zip(prompts, params)])
    while not all(h.completion for h in handles):
        graphed.step()
    assert [h.completion for h in handles] == expected  # buckets 8, 4, 2, 1 as requests end
    assert [graphed.complete([p], q)[0] for p, q in zip(prompts, params)] == expected  # replayed graphs
    assert {1, 2, 4, 8} >= set(graphed.runner._steps) and len(graphed.runner._steps) >= 2


def test_gemv_kernels_in_bfloat16_are_as_close_as_cublas():
    """The 0.5B model's decode shapes: the Triton GEMVs against float64, next to cuBLAS's error."""
    from argonne.inference.decode_kernels import gemv

    torch.manual_seed(0)
    for rows, columns, swiglu in ((1152, 896, False), (2 * 4864, 896, True), (896, 4864, False), (151_665, 896, False)):
        x = torch.randn(1, 1, columns, device="cuda", dtype=torch.bfloat16)
        weight = (torch.randn(rows, columns, device="cuda") / columns**0.5).bfloat16()
        exact = torch.nn.functional.linear(x.double(), weight.double())
        cublas = torch.nn.functional.linear(x, weight)
        if swiglu:
            gate, up = exact.chunk(2, dim=-1)
            exact = torch.nn.functional.silu(gate) * up
            gate, up = cublas.chunk(2, dim=-1)
            cublas = torch.nn.functional.silu(gate) * up
        ours = gemv(x, weight, None, swiglu)
        ours_error, cublas_error = ((t.double() - exact).norm() / exact.norm() for t in (ours, cublas))
        assert ours_error <= cublas_error * 1.05 + 1e-6, (rows, columns, ours_error, cublas_error)


@pytest.mark.parametrize("kernels", ["gemv", "gemv+attention", "gemv+attention in key ranges",
                                     "gemv+attention with qk-norm"])
def test_cuda_graph_decode_with_triton_kernels_equals_eager_decode(kernels, monkeypatch):
    from argonne.inference import decode_kernels

    if kernels.endswith("in key ranges"):
        monkeypatch.setattr(decode_kernels, "MIN_KEYS_PER_SPLIT", 16)  # the 96-key cache in 6 ranges
    config = {**LLAMA_STYLE, "max_position_embeddings": 96, "qk_norm": kernels.endswith("qk-norm")}
    prompts = prompts_of([7])  # batch 1: every decode matmul goes through the kernels
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    eager = greedy_ids(Engine(make_model(**config).cuda(), IdTokenizer(), compile=False), prompts, params)
    graphed = Engine(make_model(**config).cuda(), IdTokenizer(), compile=True, kernels=kernels.split()[0])
    assert graphed.runner.graphs and graphed.kernels == kernels.split()[0]
    assert greedy_ids(graphed, prompts, params) == eager
    assert greedy_ids(graphed, prompts, params) == eager


def test_gemv_plan_logits_in_bfloat16_are_as_close_as_cublas():
    """One token through the fused blocks (norms and residual adds inside the GEMVs) against float64."""
    import copy

    from argonne.inference.decode_kernels import use_gemv_kernels

    model = make_model(**LLAMA_STYLE).cuda()
    exact = copy.deepcopy(model).double()
    model = model.bfloat16()
    fused = use_gemv_kernels(copy.deepcopy(model))
    tokens = torch.randint(0, 320, (1, 1), device="cuda")
    with torch.no_grad():
        reference = exact(tokens).logits
        ours, cublas = (m(tokens).logits.double() for m in (fused, model))
    ours_error, cublas_error = ((t - reference).norm() / reference.norm() for t in (ours, cublas))
    assert ours_error <= cublas_error * 1.1 + 1e-6, (ours_error, cublas_error)


@pytest.mark.parametrize("length, last_key", [(512, None), (4096, 3000)])
def test_decode_attention_in_bfloat16_is_as_close_as_sdpa(length, last_key):
    """The 0.5B model's decode attention (14 query heads over 2, head_dim 64): 512 keys, a third masked, in one pass;
    a 4,096-key cache written up to key 3,000 in 8 key ranges."""
    import math

    from argonne.inference.decode_kernels import decode_attention

    torch.manual_seed(0)
    q = torch.randn(1, 1, 14 * 64, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(1, 2, length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.zeros(1, 1, 1, length, device="cuda", dtype=torch.bfloat16)
    mask[..., (340 if last_key is None else last_key + 1):] = -math.inf
    heads = q.view(1, 1, 14, 64).transpose(1, 2)
    exact = torch.nn.functional.scaled_dot_product_attention(
        heads.double(), keys.double(), values.double(), attn_mask=mask.double(), enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(heads, keys, values, attn_mask=mask, enable_gqa=True)
    written = None if last_key is None else torch.tensor([last_key], device="cuda")
    ours = decode_attention(q, keys, values, mask, 64**-0.5, written).view(1, 1, 14, 64).transpose(1, 2)
    ours_error, sdpa_error = ((t.double() - exact).norm() / exact.norm() for t in (ours, sdpa))
    assert ours_error <= sdpa_error * 1.5 + 1e-6, (ours_error, sdpa_error)  # both round the weights to bf16


def test_non_finite_logits_raise_through_cuda_graphs_and_the_engines_graphed_buckets():
    """Logits that overflow from the prefill on, or only in the captured decode steps (the engine's graphed buckets,
    on the default kernels and on torch's): the rows end there and decoding raises NonFiniteLogits, never a
    device-side assert or a token."""
    model = make_model(**{**LLAMA_STYLE, "max_position_embeddings": 96}).cuda()
    prompts = prompts_of([5, 9, 2])
    largest = torch.finfo(torch.float32).max
    for params in (SamplingParams(max_new_tokens=8, temperature=0.0), SamplingParams(max_new_tokens=8)):
        for kernels in (None, "torch"):
            engine = Engine(copy.deepcopy(model), IdTokenizer(), EngineSettings(max_batch=4, prefill_chunk=8),
                            kernels=kernels)
            assert engine.runner.graphs
            engine.warm_up()  # every bucket captured while the weights are finite
            norm = engine.model.model.norm.weight
            finite = norm.detach().clone()
            with torch.no_grad():
                norm.fill_(largest)  # every logit overflows, the prefill's too
            with pytest.raises(NonFiniteLogits):
                engine.complete(prompts, params)
            with torch.no_grad():
                norm.copy_(finite)

            def overflow_from_now_on(text):  # after the prefill's token: the replayed graphs read the weights in place
                norm.fill_(largest)  # (in the engine's step, under no_grad)

            with pytest.raises(NonFiniteLogits):
                engine.stream(prompts[0], params, overflow_from_now_on)
            assert engine.active == 0 and engine.blocks.free_count == engine.blocks.num_blocks
    torch.cuda.synchronize()  # no device-side assert pending
