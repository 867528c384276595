"""The Triton GEMV kernels for one-token decoding (decode_kernels.py): on CPUs under Triton's interpreter (float32;
conftest.py chooses it), on GPUs for real (test_gpu.py adds bfloat16 and the compiled, graphed decode step)."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow  # every test here runs Triton's interpreter or launches processes

triton = pytest.importorskip(
    "triton", reason="Triton is not installed (scripts/install.sh adds it on Linux; without a wheel for this machine "
    "its kernels cannot be checked here)")

from argonne.inference import decode_kernels  # noqa: E402
from argonne.inference.decode_kernels import attention_splits, decode_attention, gemv, use_gemv_kernels  # noqa: E402
from argonne.inference.engine import Engine, EngineSettings  # noqa: E402
from argonne.inference.sampling import SamplingParams  # noqa: E402
from argonne.modeling_argonne import RMSNorm, apply_rope, rope_cos_sin  # noqa: E402

from ..conftest import scramble_norms  # noqa: E402
from .test_runner import IdTokenizer, full_recomputation, prompts_of  # noqa: E402
from ..test_model import LLAMA_STYLE, make_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows, columns", [(37, 50), (300, 1100), (20, 2100)])  # odd sizes, rows longer than a block
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_equals_linear(rows, columns, with_bias):
    torch.manual_seed(0)
    x = torch.randn(1, 1, columns, device=DEVICE)
    weight = torch.randn(rows, columns, device=DEVICE) / columns**0.5
    bias = torch.randn(rows, device=DEVICE) if with_bias else None
    torch.testing.assert_close(gemv(x, weight, bias, False), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_swiglu_equals_silu_of_gate_times_up(with_bias):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 300, device=DEVICE)
    weight = torch.randn(2 * 70, 300, device=DEVICE) / 300**0.5  # cat(W_gate, W_up)
    bias = torch.randn(2 * 70, device=DEVICE) if with_bias else None
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(gemv(x, weight, bias, True), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_gemv_with_rms_norm_before_and_residual_after():
    torch.manual_seed(0)
    x, residual = torch.randn(1, 1, 300, device=DEVICE), torch.randn(1, 1, 70, device=DEVICE)
    norm = RMSNorm(300, eps=1e-5).to(DEVICE)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    weight, bias = torch.randn(70, 300, device=DEVICE) / 300**0.5, torch.randn(70, device=DEVICE)
    with torch.no_grad():
        expected = residual + F.linear(norm(x), weight, bias)
        ours = gemv(x, weight, bias, norm_weight=norm.weight, eps=norm.eps, residual=residual)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_gemv_with_rope_rotates_the_q_and_k_heads_only():
    """q/k/v of 3 + 1 + 1 heads of head_dim 10 (RoPE pairs i and i + 5, an odd half as Argonne 2.0's 85)."""
    torch.manual_seed(0)
    heads, head_dim, columns = 5, 10, 40
    x = torch.randn(1, 1, columns, device=DEVICE)
    weight, bias = torch.randn(heads * head_dim, columns, device=DEVICE), torch.randn(heads * head_dim, device=DEVICE)
    cos, sin = rope_cos_sin(torch.tensor([[7]], device=DEVICE), head_dim, 10_000.0, torch.float32)
    qkv = F.linear(x, weight, bias).view(1, 1, heads, head_dim).transpose(1, 2)
    expected = torch.cat([apply_rope(qkv[:, :4], cos, sin), qkv[:, 4:]], dim=1).transpose(1, 2).reshape(1, 1, -1)
    ours = gemv(x, weight, bias, rope_cos=cos, rope_sin=sin, rotated_rows=4 * head_dim)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_q_k_v_kernel_writes_keys_and_values_into_the_cache():
    """q/k/v of 4 query heads and 2 key/value heads (head_dim 10), after the RMSNorm, with RoPE: the output equals
    gemv's, and the rotated keys and the values land in column 5 of the cache (the paged pool's layout: (2,
    kv heads x length, head_dim)); nothing else in the cache changes."""
    torch.manual_seed(0)
    q_heads, kv_heads, head_dim, columns, length = 4, 2, 10, 40, 9
    rows = (q_heads + 2 * kv_heads) * head_dim
    x, norm = torch.randn(1, 1, columns, device=DEVICE), torch.randn(columns, device=DEVICE)
    weight, bias = torch.randn(rows, columns, device=DEVICE), torch.randn(rows, device=DEVICE)
    cos, sin = rope_cos_sin(torch.tensor([[5]], device=DEVICE), head_dim, 10_000.0, torch.float32)
    pool = torch.randn(2, kv_heads * length, head_dim, device=DEVICE)
    cache = pool.view(2, 1, kv_heads, length, head_dim)  # (a view to read it by head and column)
    before = cache.clone()
    common = dict(norm_weight=norm, eps=1e-6, rope_cos=cos, rope_sin=sin)
    expected = gemv(x, weight, bias, rotated_rows=(q_heads + kv_heads) * head_dim, **common)
    ours = decode_kernels.gemv_qkv_into_cache(x, weight, bias, norm, 1e-6, cos, sin, q_heads * head_dim, pool,
                                              torch.tensor([5], device=DEVICE))
    torch.testing.assert_close(ours, expected)
    keys, values = expected[0, 0, q_heads * head_dim:].view(2, kv_heads, head_dim)
    torch.testing.assert_close(cache[0, 0, :, 5], keys)
    torch.testing.assert_close(cache[1, 0, :, 5], values)
    unwritten = torch.arange(length, device=DEVICE) != 5
    assert torch.equal(cache[:, :, :, unwritten], before[:, :, :, unwritten])


@pytest.mark.parametrize("masked", [False, "additive", "boolean"])
@pytest.mark.parametrize("splits, last_key", [(1, None), (3, None), (3, 50), (4, 20)])
def test_decode_attention_equals_sdpa(masked, splits, last_key):
    """One query per row, 6 query heads over 2 key/value heads, head_dim 10, 70 keys (a partial last block); q strided
    as a slice of a merged q/k/v output; an additive or a boolean mask with row 0's first 64 keys all masked (a
    whole block, whole key ranges: no NaN). Keys done in 1, 3 or 4 ranges (combined); with `last_key`, the keys
    after it are left out (ranges with no key at all), as if not written yet."""
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, length = 2, 6, 2, 10, 70
    q = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, device=DEVICE)[..., : heads * head_dim]
    keys, values = (torch.randn(batch, kv_heads, length, head_dim, device=DEVICE) for _ in range(2))
    mask = None
    if masked:
        allowed = torch.rand(batch, length, device=DEVICE) > 0.3
        allowed[0, :64], allowed[0, 65], allowed[:, 0] = False, True, True
        if last_key is not None:
            allowed[0, last_key] = True
        mask = torch.zeros(batch, 1, 1, length, device=DEVICE).masked_fill(~allowed[:, None, None], float("-inf"))
        if masked == "boolean":
            mask = allowed[:, None, None]
    seen = length if last_key is None else last_key + 1
    expected = F.scaled_dot_product_attention(
        q.view(batch, 1, heads, head_dim).transpose(1, 2), keys[:, :, :seen], values[:, :, :seen],
        attn_mask=None if mask is None else mask[..., :seen], enable_gqa=True)
    written = None if last_key is None else torch.tensor([last_key], device=DEVICE)
    ours = decode_attention(q, keys, values, mask, head_dim**-0.5, written, splits)
    torch.testing.assert_close(ours, expected.transpose(1, 2).reshape(batch, 1, -1), rtol=1e-5, atol=1e-5)


def test_long_caches_are_split_into_key_ranges():
    assert attention_splits(batch=1, kv_heads=2, length=512) == 1  # the decode benchmark's cache: one pass
    assert attention_splits(batch=1, kv_heads=2, length=4096) == 8
    assert attention_splits(batch=16, kv_heads=2, length=4096) == 4  # enough programs already
    assert attention_splits(batch=64, kv_heads=8, length=32768) == 1


def test_the_plan_keeps_the_logits_of_one_row_and_of_many_and_the_state_dict():
    model = make_model(**{**LLAMA_STYLE, "attention_bias": True}).to(DEVICE)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    one, many = torch.randint(0, 320, (1, 1), device=DEVICE), torch.randint(0, 320, (2, 7), device=DEVICE)
    expected_one, expected_many = model(one).logits, model(many).logits
    use_gemv_kernels(model)
    assert type(model.model.layers[0]).__name__ == "GemvBlock"
    torch.testing.assert_close(model(one).logits, expected_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(many).logits, expected_many, rtol=1e-5, atol=1e-5)  # cuBLAS / MKL, merged
    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def test_other_architectures_get_the_plain_gemv():
    """A GPT-2-style model (LayerNorm, GELU): no fused block, each linear through the GEMV at one row."""
    model = make_model("argonne-1.0", vocab_size=320, hidden_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=24, intermediate_size=384, max_position_embeddings=64)
    model = model.to(DEVICE)
    one = torch.randint(0, 320, (1, 1), device=DEVICE)
    expected = model(one).logits
    use_gemv_kernels(model)
    assert type(model.model.layers[0]).__name__ == "Block"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "GemvLinear"
    torch.testing.assert_close(model(one).logits, expected, rtol=1e-5, atol=1e-5)


def greedy_ids(engine: Engine, prompts, params: SamplingParams) -> list[list[int]]:
    return [completion.token_ids for completion in engine.complete(prompts, params)]


@pytest.mark.parametrize("attention", [False, True, "in key ranges"])
def test_the_engine_with_gemv_kernels_decodes_the_same_tokens(attention, monkeypatch):
    if attention == "in key ranges":
        monkeypatch.setattr(decode_kernels, "MIN_KEYS_PER_SPLIT", 2)  # the 16 keys read (one block) in 8 ranges
    params = SamplingParams(max_new_tokens=4, temperature=0.0)  # each step is ~1 s of Triton's interpreter here
    for lengths in ([6], [5, 3]):  # batch 1 decodes through the kernels; batch 2 through cuBLAS / MKL
        prompts = prompts_of(lengths)
        config = {**LLAMA_STYLE, "max_position_embeddings": 64, "num_hidden_layers": 1}
        reference = Engine(make_model(**config).to(DEVICE), IdTokenizer(), EngineSettings(max_batch=2),
                           compile=False, kernels="torch")
        expected = greedy_ids(reference, prompts, params)
        kernels = "gemv+attention" if attention else "gemv"
        with_kernels = Engine(make_model(**config).to(DEVICE), IdTokenizer(), EngineSettings(max_batch=2),
                              compile=False, kernels=kernels)
        assert greedy_ids(with_kernels, prompts, params) == expected


@pytest.mark.parametrize("attention", [False, True])
def test_a_qk_norm_model_decodes_with_the_kernels_what_full_recomputation_gives(attention):
    """QK-norm comes before RoPE, so the q/k/v kernel must not rotate and its keys must not go into the cache
    unnormed: the one-row greedy tokens (paged cache, batch 1) equal the plain forward's."""
    config = {**LLAMA_STYLE, "max_position_embeddings": 64, "num_hidden_layers": 1, "qk_norm": True}
    prompt = prompts_of([6])[0]
    expected = full_recomputation(scramble_norms(make_model(**config)), prompt, 4)
    model = scramble_norms(make_model(**config)).to(DEVICE)
    engine = Engine(model, IdTokenizer(), EngineSettings(max_batch=1), compile=False,
                    kernels="gemv+attention" if attention else "gemv")
    assert type(model.model.layers[0]).__name__ == "GemvBlock"
    assert greedy_ids(engine, [prompt], SamplingParams(max_new_tokens=4, temperature=0.0))[0] == expected


def test_transformers_generate_with_the_plan_and_its_dynamic_cache_gives_the_same_tokens(monkeypatch):
    """Its boolean masks and its dynamic cache go through the Triton attention too."""
    import copy

    calls = []
    monkeypatch.setattr(decode_kernels, "decode_attention", lambda *args: calls.append(1) or decode_attention(*args))
    torch.manual_seed(0)
    model = make_model(**{**LLAMA_STYLE, "num_hidden_layers": 1}).to(DEVICE).eval()
    planned = use_gemv_kernels(copy.deepcopy(model), attention=True)
    prompt = torch.randint(0, 320, (1, 5), device=DEVICE)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(planned.generate(prompt, **settings), model.generate(prompt, **settings))
    assert len(calls) == 3  # the 3 one-token steps after the prefill (one layer)


HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from argonne.inference.decode_kernels import GEMV_TILINGS, _gemv_kernel


def compile_for_hopper():  # its lines start with "hopper"
    kernel = _gemv_kernel.fn
    names = kernel.arg_names
    pointers = names[: names.index("N")]
    rows, columns, warps = GEMV_TILINGS[0]
    # (SWIGLU, HAS_NORM, HAS_RESIDUAL, HEAD_DIM, TO_CACHE) as GemvBlock and the plain linears use them
    uses = [(False, False, False, 0, False), (False, True, False, 64, False), (False, True, False, 64, True),
            (False, True, False, 0, False), (False, False, True, 0, False), (True, True, False, 0, False)]
    for swiglu, norm, residual, head_dim, to_cache in uses:
        for bias in (False, True):
            flags = {"HAS_BIAS": bias, "SWIGLU": swiglu, "HAS_NORM": norm, "HAS_RESIDUAL": residual,
                     "HEAD_DIM": head_dim, "TO_CACHE": to_cache, "BLOCK_N": rows, "BLOCK_K": columns}
            scalars = {name: "i32" for name in ("N", "K", "rotated_rows", "q_rows", "kv_rows", "cache_len")}
            # eps float64: torch 2.11's Inductor types a Python float argument so (Triton's own launcher: float32)
            signature = {name: "*bf16" for name in pointers} | {"column_ptr": "*i64", "eps": "fp64"} | scalars
            source = ASTSource(
                fn=kernel, signature=signature | {name: "constexpr" for name in flags},
                constexprs={(names.index(name),): value for name, value in flags.items()},
                attrs={(names.index(name),): [["tt.divisibility", 16]] for name in [*pointers, "K"]},
            )
            try:
                ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
            except RuntimeError as error:
                print(f"hopper no sm_90 tool chain: {error}")
                return
            print("hopper", flags, "ld.global.v4.b32" in ptx)

    from argonne.inference.decode_kernels import ATTENTION_TILINGS, _combine_splits_kernel, _decode_attention_kernel
    attention = _decode_attention_kernel.fn  # tensor-core products, whole or in key ranges
    names = attention.arg_names
    keys_per_step, warps = ATTENTION_TILINGS[0]
    # the 0.5B model's and Argonne 2.0's heads, whole and in key ranges; a boolean mask (transformers' generate())
    for head_dim, group, split, boolean in ((64, 7, False, False), (64, 7, True, False), (170, 3, False, False),
                                            (170, 3, True, False), (64, 7, False, True)):
        block_d = triton.next_power_of_2(head_dim)
        flags = {"GROUP": group, "HEAD_DIM": head_dim, "HAS_MASK": True, "BOOL_MASK": boolean, "HAS_LAST_KEY": True,
                 "SPLIT": split, "BLOCK_G": 16, "BLOCK_D": block_d, "BLOCK_S": keys_per_step, "PRECISION": "tf32"}
        integers = ["S", "keys_per_split", "n_kv", "q_row_stride", "kv_head_stride", "mask_row_stride"]
        pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1" if boolean else "*bf16",
                    "last_key_ptr": "*i64", "out_ptr": "*fp32" if split else "*bf16", "lse_ptr": "*fp32"}
        signature = pointers | {name: "i32" for name in integers} | {"scale": "fp64"}  # float64: as Inductor passes it
        source = ASTSource(
            fn=attention, signature=signature | {name: "constexpr" for name in flags},
            constexprs={(names.index(name),): value for name, value in flags.items()},
            attrs={(names.index(name),): [["tt.divisibility", 16]] for name in [*pointers, *integers[3:]]},
        )
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        print("hopper attention", head_dim, split, boolean, "mma" in ptx)
    combine = _combine_splits_kernel
    flags = {"HEAD_DIM": 64, "BLOCK_SPLITS": 8, "BLOCK_D": 64}
    source = ASTSource(
        fn=combine, signature={"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "splits": "i32"}
        | {name: "constexpr" for name in flags},
        constexprs={(combine.arg_names.index(name),): value for name, value in flags.items()},
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    print("hopper combine", "st.global" in ptx)


try:
    compile_for_hopper()
except Exception as error:  # the hopper test fails on its own line; the traces below still run
    print(f"hopper error: {type(error).__name__}: {error}".replace("\\n", " "))
"""


def test_the_kernel_compiles_for_hopper_with_16_byte_loads(without_interpreter):
    """Compiled, not run, for sm_90 as Triton's launcher specializes it for the 0.5B model (K a multiple of 16,
    aligned pointers): every flag combination compiles, and the weights are read with 16-byte vector loads, which is
    what lets a GEMV run at memory bandwidth; the decode attention compiles to tensor-core products."""
    lines = [line.removeprefix("hopper ") for line in without_interpreter if line.startswith("hopper ")]
    if lines and lines[-1].startswith("no sm_90 tool chain"):
        pytest.skip(f"this Triton build has no NVIDIA tool chain, so nothing can be compiled for sm_90 here "
                    f"({lines[-1][:300]})")
    assert len(lines) == 18 and all(line.endswith("True") for line in lines), lines


def test_gemv_kernels_on_a_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA GPUs"):
        Engine(make_model(**LLAMA_STYLE), IdTokenizer(), kernels="gemv")


TRACE_DECODE_STEP = """
import sys
import torch, triton
from functorch.compile import aot_module_simplified
from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core
from triton.backends.compiler import GPUTarget
from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.inference import decode_kernels
from argonne.inference.decode_kernels import use_gemv_kernels
from argonne.inference.engine import Engine, EngineSettings


class CompileOnlyDriver:  # a CUDA target for Triton's compiler (torch's analysis of what a kernel writes); no device
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise RuntimeError(f"no device: {name}")


class IdTokenizer:
    eos_token_id = None


triton.runtime.driver.set_active(CompileOnlyDriver())
torch.set_grad_enabled(False)  # as in generation
graphs = []


def capture(gm, example_inputs):  # trace as torch.compile does (Dynamo, AOTAutograd), keep the graph, run nothing
    return aot_module_simplified(gm, example_inputs, fw_compiler=lambda graph, _: graphs.append(graph) or graph,
                                 keep_inference_input_mutations=True)  # as Inductor traces inference graphs


def trace(attention):
    graphs.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=2)).eval()
    # One row of up to 256 tokens, compiled as on a GPU (the step reads every key position of the row's table), the
    # model prepared on torch's kernels (the Triton ones need a GPU or the interpreter), then given the plan.
    engine = Engine(model, IdTokenizer(), EngineSettings(max_batch=1, max_len=256), compile=True)
    runner = engine.runner
    # the 256 keys in 16 ranges, or (the default) whole
    decode_kernels.MIN_KEYS_PER_SPLIT = 16 if attention == "attention-in-key-ranges" else MIN_KEYS_PER_SPLIT
    use_gemv_kernels(model, attention=attention != "sdpa")
    runner._step = torch.compile(runner._decode_logits, backend=capture, fullgraph=True, dynamic=False)
    runner.set_table(0, [0])  # a decode step after a 3-token prompt: block 0 holds positions 0-2, token 7 at 3
    try:
        runner.decode(1, torch.tensor([7]), torch.tensor([3]))
    except Exception:
        pass  # running the kernels needs a GPU; the traced graph is what is checked
    graph = graphs[0].graph
    nodes = [node for node in graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    written = sorted({name for node in nodes for name in node.kwargs["tensors_to_clone"]})
    reinplace_inplaceable_ops_core(graph)  # Inductor's pass: a kernel writes in place what it need not copy
    cloned = sorted({name for node in nodes for name in node.kwargs["tensors_to_clone"]})
    writes = (torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default, torch.ops.aten.index_copy.default)
    cache_writes = sum(node.target in writes for node in graph.nodes)
    print(attention, len(nodes), written, cloned, cache_writes)


MIN_KEYS_PER_SPLIT = decode_kernels.MIN_KEYS_PER_SPLIT
for attention in sys.argv[1:]:  # several in one process: starting one costs more than a trace
    trace(attention)
"""


TRACED = {  # attention: (kernels, tensors they write, indexed writes to the cache's pool)
    "sdpa": (9, ["out_ptr"], 2),
    "attention": (11, ["cache_ptr", "out_ptr"], 0),  # keys and values go into the cache from the q/k/v kernel
    "attention-in-key-ranges": (13, ["cache_ptr", "lse_ptr", "out_ptr"], 0),  # + the ranges' outputs (fresh)
}


@pytest.fixture(scope="module")
def without_interpreter() -> list[str]:
    """HOPPER_COMPILE, then TRACE_DECODE_STEP for every attention of TRACED, in one process without Triton's
    interpreter (it cannot be turned off in this one): the lines they print."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE + TRACE_DECODE_STEP, *TRACED], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def traced(without_interpreter) -> dict[str, str]:
    """TRACE_DECODE_STEP's line for each attention of TRACED."""
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in without_interpreter
            if line.split(" ", 1)[0] in TRACED}


@pytest.mark.parametrize("attention", TRACED)
def test_the_decode_step_with_the_plan_traces_as_torch_compile_does(traced, attention):
    """On a GPU the decode step is compiled whole (fullgraph) with the kernels inside. Here it is traced as
    torch.compile traces it, with a compile-only CUDA target for Triton: the trace must hold every kernel (4 GEMVs
    per layer and the head's, with the Triton attention 1 more per layer, 2 when it splits the keys into ranges),
    find that each writes only its output (and the cache), and after Inductor's re-inplacing pass nothing is
    copied: the cache is written in place, by the q/k/v kernel itself with the Triton attention."""
    kernels, written, cache_writes = TRACED[attention]
    assert traced[attention] == f"{kernels} {written} [] {cache_writes}", traced
