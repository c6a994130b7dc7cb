"""LyCORIS LoHa and LoKr files, applied exactly: each fixture is written by the `lycoris-lora` package
itself (its modules on the tiny SD 1.x UNet: attention and feed-forward Linears, 3x3 and 1x1 convs),
under kohya's names, and its reference is plain diffusers with every UNet weight patched by the dW that
`lycoris.functional` computes. The rewrite into LoRA factors is checked against the same functions."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("lycoris")

from test_compat import EFFECT, EQUAL, add, assert_refused, engine_top1, new_catalog  # noqa: E402
from test_engine import GUIDANCE, PROMPT, STEPS, diff, plain_images, reference_blend  # noqa: E402

from mixdiff_cli import testing  # noqa: E402
from mixdiff_cli.catalog.formats import inspect_source  # noqa: E402
from mixdiff_cli.catalog.lycoris import as_lora  # noqa: E402
from mixdiff_cli.catalog.schema import load_catalog  # noqa: E402
from mixdiff_cli.sampling.engine import Engine, Request  # noqa: E402

ALPHA, DIM = 2.0, 4  # alpha / dim = 0.5: the scale is applied once, as A1111 and LyCORIS' functional code do


def lycoris_network(unet, algo: str, seed: int):
    """The lycoris-lora package's network of `algo` over `unet`'s Transformer2DModel and ResnetBlock2D
    modules, every factor drawn at random (LyCORIS starts one at zero), not applied."""
    import torch
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    extra = {"algo": "locon", "use_tucker": True} if algo == "tucker" else {"algo": algo, "factor": 4}
    net = create_lycoris(unet, 1.0, linear_dim=DIM, linear_alpha=ALPHA, conv_dim=DIM, conv_alpha=ALPHA, **extra)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.35 if algo == "loha" else 0.2))
    return net


def reference_delta(module, algo: str):
    """dW of one LyCORIS module by lycoris.functional (the scale alpha / dim once)."""
    import torch
    from lycoris.functional import locon, loha, lokr

    if algo == "tucker":  # a LoCon: 3x3 convs with a Tucker core (lora_mid), the rest plain
        mid = module.lora_mid.weight if getattr(module, "tucker", False) else None
        return locon.diff_weight(module.lora_down.weight, module.lora_up.weight, mid, gamma=float(module.alpha) / module.lora_dim).detach()
    if algo == "loha":
        w = module.hada_w1_b, module.hada_w1_a, module.hada_w2_b, module.hada_w2_a, None, None
        return loha.diff_weight(*w, gamma=torch.tensor(float(module.alpha) / module.hada_w1_b.shape[0])).detach()
    get = lambda n: getattr(module, n, None)  # noqa: E731
    w2b = get("lokr_w2_b")
    shape = module.shape
    if w2b is not None and len(shape) == 4:
        w2b = w2b.reshape(w2b.shape[0], shape[1] // get("lokr_w1").shape[1], *shape[2:])
    return lokr.diff_weight(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"), w2b, None,
                            gamma=float(module.alpha)).detach()


@dataclass
class Case:
    arch: str
    algo: str
    base: Path
    path: Path  # the file, kohya-named as LyCORIS' kohya integration writes it
    patched: object  # plain diffusers UNet with every module's dW added
    modules: dict  # kohya stem -> the LyCORIS module


@pytest.fixture(scope="module", params=[("sd1", "loha"), ("sd1", "lokr"), ("sd1", "tucker"), ("sdxl", "loha"), ("sdxl", "lokr")],
                ids=lambda p: "-".join(p))
def lycoris_case(request, tiny_sd, tiny_sdxl, tmp_path_factory) -> Case:
    import torch
    from safetensors.torch import save_file

    from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

    arch, algo = request.param
    base = tiny_sd if arch == "sd1" else tiny_sdxl
    pipe = testing.load_pipeline(base)
    net = lycoris_network(pipe.unet, algo, seed=7)
    where = {id(m): name for name, m in pipe.unet.named_modules()}
    cfg = dict(pipe.unet.config)
    # kohya names: SD 1.x the diffusers module path, SDXL the original SGM one (sd-scripts' SDXL UNet)
    stem = lambda name: "lora_unet_" + (name if arch == "sd1" else diffusers_to_sgm(name, cfg)).replace(".", "_")  # noqa: E731
    modules = {stem(where[id(lyco.org_module[0])]): lyco for lyco in net.loras}
    state = {f"{s}.{k}": v.detach().clone().contiguous() for s, lyco in modules.items() for k, v in lyco.state_dict().items()}
    deltas = {where[id(lyco.org_module[0])]: reference_delta(lyco, algo) for lyco in net.loras}
    net.restore()  # before the copy: applied, LyCORIS replaces each module's forward
    patched = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, delta in deltas.items():
            target = patched.get_submodule(name)
            target.weight += delta.reshape(target.weight.shape)
    path = tmp_path_factory.mktemp(algo) / f"{algo}.safetensors"
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo}"}}'})
    return Case(arch, algo, base, path, patched, modules)


def test_rewrite_equals_lycoris_delta_for_every_module(lycoris_case):
    import torch

    from safetensors.torch import load_file

    c = lycoris_case
    lora = as_lora(load_file(str(c.path)), {s: tuple(m.shape) for s, m in c.modules.items()}.get)
    worst, kinds = 0.0, set()
    for stem, lyco in c.modules.items():
        down, up = lora[f"{stem}.lora_down.weight"], lora[f"{stem}.lora_up.weight"]
        assert f"{stem}.alpha" not in lora  # the scale is folded into lora_up
        got = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        want = reference_delta(lyco, c.algo).reshape(got.shape)
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
        kinds.add(len(lyco.shape))
        assert down.shape[0] <= min(got.shape), stem  # never above the dense rank
    assert worst < 1e-5 and kinds == {2, 4}  # Linear and Conv2d modules alike
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_top1_equals_diffusers_with_the_lycoris_delta_patched_in(lycoris_case, tmp_path):
    c = lycoris_case
    algo, path = c.algo, c.path
    catalog = new_catalog(tmp_path, c.base)
    res = add(catalog, path, algo)
    assert res.exit_code == 0, res.output
    expert = load_catalog(catalog).expert(algo)
    info = inspect_source(path, checksum=False)
    assert expert.format == "kohya" and expert.arch == c.arch and info.lycoris
    assert next(iter(info.lycoris)).startswith({"loha": "LoHa 4x4", "lokr": "LoKr factor", "tucker": "LoCon with Tucker factors"}[algo])
    convs = {"conv1", "conv2", "conv_shortcut"} if c.arch == "sd1" else {"in_layers.2", "out_layers.3", "skip_connection"}  # SGM names
    assert convs | {"proj_in", "to_q", "ff.net.2"} <= set(info.targets)
    import json

    from test_compat import run

    shown = json.loads(run("--json", "experts", "show", algo, "--catalog", catalog).stdout)
    first = {"loha": f"LyCORIS LoHa 4x4 ({len(c.modules)} modules)", "lokr": "LyCORIS LoKr factor", "tucker": "LyCORIS LoCon with Tucker factors"}
    assert shown["adapter"].startswith(first[algo])
    assert shown["adapter"].endswith(f"effective rank {expert.rank}") and expert.rank == info.rank
    got, bare = engine_top1(catalog, algo)
    pipe = testing.load_pipeline(c.base)
    pipe.unet = c.patched
    want = plain_images(pipe)[0]
    print(f"\n[lycoris] {c.arch} {algo}: top-1 vs patched diffusers {diff(got, want):.2e}, vs bare base {diff(got, bare):.3f}")
    assert diff(got, want) <= EQUAL and diff(got, bare) > EFFECT


def test_noise_blend_of_a_lycoris_file_and_a_kohya_lora(lycoris_case, compat_files, tmp_path):
    c = lycoris_case
    kohya = compat_files[(c.arch, "kohya")]
    catalog = new_catalog(tmp_path, c.base)
    assert add(catalog, c.path, c.algo).exit_code == 0 and add(catalog, kohya, "kohya").exit_code == 0
    members = [(c.algo, 0.5), ("kohya", 0.5)]
    got = Engine(catalog).generate([Request(PROMPT, seed=0, steps=STEPS)], members, blend="noise", output_type="np")[0]
    pipe = testing.load_pipeline(c.base)
    pipe.load_lora_weights(str(kohya), adapter_name="kohya")
    want = reference_blend(pipe, members, guidance=GUIDANCE[c.arch], models={c.algo: c.patched})
    assert diff(got, want) <= EQUAL


# --- refusals ---------------------------------------------------------------------------------------


def _edited(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    edit(state)
    save_file(state, str(dst))
    return dst


def test_bad_lycoris_factors_are_refused_in_one_line(lycoris_case, tmp_path):
    import torch

    if lycoris_case.arch != "sd1" or lycoris_case.algo == "tucker":
        pytest.skip("header checks do not depend on the architecture; LoCon's are in test_compat")
    algo, path = lycoris_case.algo, lycoris_case.path
    catalog = new_catalog(tmp_path, lycoris_case.base)
    key = next(k for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path))
               if k.endswith(".hada_w2_b" if algo == "loha" else ".lokr_w2_b") and "attn1_to_q" in k)

    def shrink(state):
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)

    bad = _edited(path, tmp_path / "bad.safetensors", shrink)
    if algo == "loha":  # the two Hadamard factors disagree
        assert_refused(catalog, bad, "LoHa module", "attn1.to_q", "do not make one weight")
    else:  # kron(w1, w2a w2b) is 4 x 17 = 68 columns wide, the module 64
        assert_refused(catalog, bad, "attn1.to_q: 68->64", "do not match the base UNet (64->64)")
    tucker = _edited(path, tmp_path / "tucker.safetensors",
                     lambda s: s.update({key.rsplit(".", 1)[0] + (".hada_t1" if algo == "loha" else ".lokr_t2"): torch.zeros(4, 4, 3, 3)}))
    assert_refused(catalog, tucker, "Tucker")


def test_two_bands_a_lokr_then_a_kohya_lora_equal_the_switching_reference(lycoris_case, tmp_path):
    """Steps 0-2 under the LoKr, 3-9 under a plain kohya LoRA: plain diffusers, its UNet swapped mid-run."""
    import numpy as np
    import torch

    from mixdiff_cli.sampling.engine import make_scheduler
    from mixdiff_cli.testing import make_lora

    c = lycoris_case
    if (c.arch, c.algo) != ("sd1", "lokr"):
        pytest.skip("bands are checked once, with a LoKr on SD 1.x")
    kohya = make_lora(c.base, tmp_path / "pixel.safetensors", "kohya", seed=12, scale=0.2)
    catalog = new_catalog(tmp_path, c.base)
    assert add(catalog, c.path, "lokr").exit_code == 0 and add(catalog, kohya, "pixel").exit_code == 0
    seeds, steps = [3, 4], 10
    got = np.stack(Engine(catalog).generate([Request(PROMPT, seed=s, steps=steps, scheduler="ddim") for s in seeds],
                                            ["lokr@:0.3", "pixel@0.3:"], output_type="np"))
    pipe = testing.load_pipeline(c.base)
    pipe.load_lora_weights(str(kohya), adapter_name="pixel")
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    adapted = pipe.unet

    def reference(switch_after: int):
        pipe.unet = c.patched

        def switch(p, i, t, tensors):
            if i == switch_after:
                p.unet = adapted
            return tensors

        return pipe([PROMPT] * len(seeds), num_inference_steps=steps, output_type="np", callback_on_step_end=switch,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    assert diff(got, reference(2)) <= EQUAL
    assert diff(got, reference(3)) > EQUAL  # the boundary is where the grammar puts it


@pytest.mark.parametrize(("arch", "algo"), [("sd1", "loha"), ("sdxl", "lokr")])
def test_text_encoder_modules_are_applied_too(arch, algo, tiny_sd, tiny_sdxl, tmp_path):
    """A file whose LyCORIS modules adapt the text encoders (kohya's lora_te_ / lora_te1_ / lora_te2_):
    top-1 equals plain diffusers with each text encoder's weights patched by dW."""
    import torch
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import save_file

    base = tiny_sd if arch == "sd1" else tiny_sdxl
    pipe = testing.load_pipeline(base)
    prefixes = {"text_encoder": "lora_te_" if arch == "sd1" else "lora_te1_", "text_encoder_2": "lora_te2_"}
    state, patched = {}, {}
    for component, prefix in prefixes.items():
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        LycorisNetwork.apply_preset({"target_module": ["CLIPAttention", "CLIPMLP"]})
        extra = {"algo": algo, "factor": 4}
        net = create_lycoris(encoder, 1.0, linear_dim=DIM, linear_alpha=ALPHA, **extra)
        net.apply_to()
        gen = torch.Generator().manual_seed(len(state) + 3)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        where = {id(m): name for name, m in encoder.named_modules()}
        for lyco in net.loras:
            name = where[id(lyco.org_module[0])]
            state |= {f"{prefix}{name.replace('.', '_')}.{k}": v.detach().clone().contiguous() for k, v in lyco.state_dict().items()}
        deltas = {where[id(lyco.org_module[0])]: reference_delta(lyco, algo) for lyco in net.loras}
        net.restore()
        copy_ = copy.deepcopy(encoder)
        with torch.no_grad():
            for name, delta in deltas.items():
                copy_.get_submodule(name).weight += delta.reshape(copy_.get_submodule(name).weight.shape)
        patched[component] = copy_
    path = tmp_path / f"te-{algo}.safetensors"
    save_file(state, str(path))
    catalog = new_catalog(tmp_path, base)
    assert add(catalog, path, "te").exit_code == 0
    info = inspect_source(path, checksum=False)
    assert info.has_text_encoder and not info.unet_shapes and {c for c, _ in info.text_shapes} == set(patched)
    got, bare = engine_top1(catalog, "te")
    for component, encoder in patched.items():
        setattr(pipe, component, encoder)
    want = plain_images(pipe)[0]
    assert diff(got, want) <= EQUAL and diff(got, bare) > EFFECT


@pytest.mark.parametrize("peft_type", ["loha", "lokr"])
def test_peft_loha_and_lokr_folders_equal_peft_merging_them(peft_type, tiny_sd, tmp_path):
    """PEFT's own LoHa / LoKr adapters (save_pretrained) on Linear and conv layers: top-1 equals plain
    diffusers with the UNet PEFT merged (`merge_and_unload`), alpha / r as PEFT scales it."""
    import torch
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    pipe = testing.load_pipeline(tiny_sd)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv_shortcut"]
    config = (LoHaConfig(r=4, alpha=8, target_modules=targets) if peft_type == "loha"
              else LoKrConfig(r=4, alpha=8, target_modules=targets, decompose_factor=4))
    model = get_peft_model(pipe.unet, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{peft_type}_" in name or ".hada_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path / f"peft-{peft_type}"
    model.save_pretrained(folder)
    pipe.unet = model.merge_and_unload()
    want = plain_images(pipe)[0]
    catalog = new_catalog(tmp_path, tiny_sd)
    res = add(catalog, folder, peft_type)
    assert res.exit_code == 0, res.output
    info = inspect_source(folder, checksum=False)
    assert info.format == "peft" and info.lycoris and {"conv1", "proj_in", "to_q"} <= set(info.targets)
    got, bare = engine_top1(catalog, peft_type)
    assert diff(got, want) <= EQUAL and diff(got, bare) > EFFECT


def test_merge_of_a_lycoris_file_and_a_kohya_lora(lycoris_case, compat_files, tmp_path):
    """blend=merge, weights 0.6 / 0.4: plain diffusers with 0.6 dW patched in and the kohya LoRA at 0.4."""
    import torch

    c = lycoris_case
    if c.arch != "sd1":
        pytest.skip("merge is checked on SD 1.x")
    kohya = compat_files[("sd1", "kohya")]
    catalog = new_catalog(tmp_path, c.base)
    assert add(catalog, c.path, c.algo).exit_code == 0 and add(catalog, kohya, "kohya").exit_code == 0
    got = Engine(catalog).generate([Request(PROMPT, seed=0, steps=STEPS)], [(c.algo, 0.6), ("kohya", 0.4)], blend="merge",
                                   output_type="np")[0]
    pipe = testing.load_pipeline(c.base)
    base_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():  # 0.6 of the LyCORIS dW (patched = base + dW)
        for (name, p), b in zip(c.patched.named_parameters(), base_unet.parameters()):
            dict(pipe.unet.named_parameters())[name].copy_(b + 0.6 * (p - b))
    pipe.load_lora_weights(str(kohya), adapter_name="kohya")
    pipe.set_adapters(["kohya"], adapter_weights=[0.4])
    want = plain_images(pipe)[0]
    assert diff(got, want) <= EQUAL


def test_lycoris_own_module_names_are_refused_with_the_way_out(lycoris_case, tmp_path):
    if (lycoris_case.arch, lycoris_case.algo) != ("sd1", "loha"):
        pytest.skip("once")
    renamed = _edited(lycoris_case.path, tmp_path / "native.safetensors",
                      lambda s: s.update({k.replace("lora_unet_", "lycoris_", 1): s.pop(k) for k in list(s)}))
    message = assert_refused(new_catalog(tmp_path, lycoris_case.base), renamed, "LyCORIS LoHa", "kohya's module names")
    assert "lycoris.kohya" in message


def test_the_memory_estimate_is_the_rewritten_size(lycoris_case, tmp_path):
    """--max-memory plans with the header's estimate: for a LyCORIS file, the size of the LoRA it becomes."""
    c = lycoris_case
    if c.arch != "sd1":
        pytest.skip("sizes are checked on SD 1.x")
    catalog = new_catalog(tmp_path, c.base)
    assert add(catalog, c.path, c.algo).exit_code == 0
    engine = Engine(catalog)
    hint = engine._size_hint(load_catalog(catalog).expert(c.algo))
    engine.ensure_loaded([c.algo])
    real = engine.resident_bytes
    assert real > 0 and abs(hint - real) / real < 0.05, (hint, real, c.path.stat().st_size)
