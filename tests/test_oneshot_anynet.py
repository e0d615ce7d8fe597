"""One-shot pruning of any network: an nn.Sequential MLP, a ResNet-style CNN, a timm-style ViT,
convolution statistics from unfolded (im2col) inputs, and patch embeddings left dense."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import GradualPruning, OneShotPruning
from lightning_prune.calibration import (
    FeatureNormStats,
    HessianStats,
    calibrate_sequentially,
    collect_statistics,
    find_block_stack,
    find_blocks,
    unfold_inputs,
)
from lightning_prune.calibration.calls import block_output
from lightning_prune.data import DigitsDataModule
from lightning_prune.masking import get_masks
from lightning_prune.models import ClassifierModule
from lightning_prune.oneshot import plan_oneshot, prune_oneshot
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.targets import PruneTarget, find_targets

# --- the three networks, tiny ------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """torchvision's layout: a stem conv (`conv1`, or a `stem` module), residual stages, `fc`."""

    def __init__(self, stem: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        first = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        if stem:
            self.stem = first
        else:
            self.conv1 = first
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) if hasattr(self, "stem") else self.conv1(x)
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """timm's VisionTransformer layout: `patch_embed` conv, cls token, `self.blocks = nn.Sequential(...)`, `head`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock() for _ in range(3)))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def images(channels: int, size: int, count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, size, size, generator=generator) for _ in range(count)]


NETWORKS = {
    "mlp": (mlp, lambda: [torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in range(3)]),
    "resnet": (ResNet, lambda: images(4, 8)),
    "vit": (ViT, lambda: images(3, 8)),
}
LAYERS = {
    "mlp": ["0.weight", "2.weight"],
    "resnet": [
        "conv1.0.weight",
        *(f"layer1.{i}.conv{j}.weight" for i in range(2) for j in (1, 2)),
        "layer2.0.conv1.weight",
        "layer2.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.1.conv1.weight",
        "layer2.1.conv2.weight",
    ],
    "vit": [f"blocks.{i}.{name}.weight" for i in range(3) for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")],
}


def _prune(name: str, method: str, pattern: str | None) -> tuple[nn.Module, list[torch.Tensor], object, list]:
    build, data = NETWORKS[name]
    model, batches = build(), data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_oneshot(model, batches, method=method, sparsity=0.5, pattern=pattern, progress=False)
    return model, batches, report, [str(w.message) for w in caught]


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria"])
@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_oneshot_prunes_exactly_every_layer_of_any_network(name: str, method: str, pattern: str | None) -> None:
    model, batches, report, caught = _prune(name, method, pattern)
    masks = get_masks(model)
    assert sorted(masks) == sorted(LAYERS[name])  # heads and patch embedding dense
    assert [layer.name for layer in report.layers] == LAYERS[name]
    parameters = dict(model.named_parameters())
    for layer in report.layers:
        assert layer.zeros == layer.numel // 2, layer.name  # exact: every row half pruned
        matrix = parameters[layer.name].detach().flatten(1)
        assert int((matrix == 0).sum()) == layer.numel // 2
        if pattern == "2:4":
            assert max_nonzeros_per_group(matrix, 4) == 2, layer.name
    with torch.no_grad():
        assert all(torch.isfinite(model(x)).all() for x in batches)
    whole = [note for note in report.notes if note.startswith("calibrated in one whole-model pass")]
    assert bool(whole) == (name != "vit")  # the ViT's blocks are a chained block list
    assert [m for m in caught if m.startswith("calibrated in one whole-model pass")] == whole
    if whole and method == "sparsegpt":
        assert whole[0].endswith("weight updates use the dense inputs (non-sequential)")


def test_the_vit_patch_embedding_stays_dense_unless_targeted() -> None:
    model, *_ = _prune("vit", "wanda", None)
    assert not (model.patch_embed.proj.weight == 0).any() and not (model.head.weight == 0).any()
    model = ViT()
    report = prune_oneshot(model, images(3, 8), targets=r"patch_embed|blocks\.0\.mlp", progress=False)
    # whole-model mode: the explicitly named patch embedding lies outside the blocks
    names = ["patch_embed.proj.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"]
    assert [layer.name for layer in report.layers] == names
    assert [layer.sparsity for layer in report.layers] == [0.5, 0.5, 0.5]
    assert report.notes and "outside the block lists ['blocks']: patch_embed.proj.weight" in report.notes[0]
    assert [t.name for t in find_targets(ViT())][:2] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"]
    gmp = GradualPruning(0.5, end_step=1)
    assert "patch_embed.proj.weight" not in [t.name for t in gmp.resolve_targets(ViT())]
    assert "stem.0.weight" not in [t.name for t in find_targets(ResNet(stem=True))]


def test_a_named_sequential_is_a_block_list_and_the_driver_gives_each_block_its_own_arguments() -> None:
    model, batches = ViT().eval(), images(3, 8)
    assert find_blocks(model) == [("blocks", model.blocks)]
    assert find_blocks(model, "blocks") == [("blocks", model.blocks)]
    expected: dict[str, list[torch.Tensor]] = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, k=f"blocks.{i}": expected.setdefault(k, []).append(o))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    got: dict[str, list[torch.Tensor]] = {}

    def record(index: int, name: str, block: nn.Module, run_block) -> None:
        got[name] = [block_output(o) for o in run_block(keep_outputs=True)]

    assert calibrate_sequentially(model, batches, record, blocks="blocks", progress=False) == ["blocks"]
    assert got.keys() == expected.keys()
    for name, outputs in expected.items():
        assert all(torch.equal(want, have) for want, have in zip(outputs, got[name], strict=True)), name
    report = prune_oneshot(model, batches, method="sparsegpt", blocks="blocks", progress=False)
    assert not report.notes and len(report.layers) == 12
    # Structured pruning's one stack stays a ModuleList (a Sequential when named): its CNN path is unchanged.
    with pytest.raises(ValueError, match=r"found no nn\.ModuleList of blocks in ViT"):
        find_block_stack(model)
    assert find_block_stack(model, "blocks") == ("blocks", model.blocks)


def test_a_resnet_with_a_stem_is_calibrated_stage_by_stage() -> None:
    model = ResNet(stem=True)
    plan = plan_oneshot(model, None, None, None)
    assert [name for name, _ in plan.stacks] == ["layer1", "layer2"] and not plan.whole_model
    report = prune_oneshot(model, images(4, 8), method="sparsegpt", pattern="2:4", progress=False)
    assert not report.notes and len(report.layers) == 9 and report.global_sparsity == 0.5
    assert not (model.stem[0].weight == 0).any()


class UNet(nn.Module):
    """Sequentials of blocks whose forward is not a chain: the up blocks take skip connections."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(2)))
        self.up = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()) for _ in range(2)))
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for block in self.up:
            x = block(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def test_found_sequentials_that_the_forward_does_not_chain_fall_back_to_a_whole_model_pass() -> None:
    model = UNet()
    assert plan_oneshot(model, None, None, None).fallback
    with pytest.warns(
        UserWarning, match=r"whole-model pass \(the blocks of \['down', 'up'\] are not chained: block up\.1"
    ):
        report = prune_oneshot(model, images(4, 8), method="sparsegpt", pattern="2:4", progress=False)
    assert [layer.name for layer in report.layers] == [
        "down.0.0.weight",
        "down.1.0.weight",
        "up.0.0.weight",
        "up.1.0.weight",
    ]
    assert all(layer.sparsity == 0.5 for layer in report.layers) and not (model.out.weight == 0).any()
    with pytest.raises(ValueError, match=r"block up\.1 does not take the output of up\.0"):  # named: no fallback
        prune_oneshot(UNet(), images(4, 8), blocks=["down", "up"], progress=False)


def test_whole_model_calibration_leaves_batchnorm_and_train_mode_as_they_were() -> None:
    model = ResNet().train()
    model.layer1[0].bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    prune_oneshot(model, images(4, 8), method="wanda", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and model.layer1[1].bn1.training and not model.layer1[0].bn1.training


def test_block_options_are_refused_in_whole_model_mode_and_nothing_changes() -> None:
    for options, argument in [
        ({"sparsity_profile": "owl"}, "sparsity_profile"),
        ({"reconstruct": True}, "reconstruct"),
        ({"offload": True}, "offload"),
    ]:
        model = ResNet()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"`{argument}`=.* one whole-model pass \(no block list found"):
            prune_oneshot(mlp(), [torch.randn(2, 16)], progress=False, **options)
        with pytest.raises(ValueError, match=rf"`{argument}`=.*layers outside the block lists"):
            prune_oneshot(model, images(4, 8), progress=False, **options)
        assert not get_masks(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_whole_model_pass_that_cannot_finish_leaves_the_model_as_it_was() -> None:
    model = ResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan = images(4, 8)
    nan[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calibration activations entering 'conv1.0.weight' contain NaN"):
        prune_oneshot(model, nan, method="sparsegpt", progress=False)
    with pytest.raises(ValueError, match=r"calibration batch 1 \(tensor \(2, 3, 8, 8\)\) failed in the model"):
        prune_oneshot(model, [images(4, 8)[0], images(3, 8)[0]], method="wanda", progress=False)
    assert not get_masks(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_grouped_convolutions_are_left_out_by_default_and_refused_when_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    report = prune_oneshot(model, images(4, 8), progress=False)
    assert [layer.name for layer in report.layers] == ["0.weight"]
    with pytest.raises(ValueError, match=r"`targets`='1' matches grouped convolutions .*\['1.weight'\]"):
        prune_oneshot(model, images(4, 8), targets="1", progress=False)


# --- convolution statistics from unfolded inputs ---------------------------------------------


def _im2col(x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Unfold by slicing: one row per output position, features channel-major then kernel row, column."""
    x = F.pad(x, [padding] * 4)
    span = dilation * (kernel - 1) + 1
    rows = []
    for n in range(x.shape[0]):
        for i in range(0, x.shape[2] - span + 1, stride):
            for j in range(0, x.shape[3] - span + 1, stride):
                rows.append(x[n, :, i : i + span : dilation, j : j + span : dilation].reshape(-1))
    return torch.stack(rows)


CONVS = {
    "stride2-pad1-dil2": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2),
    "pad-same": lambda: nn.Conv2d(3, 4, (2, 3), padding="same"),
    "reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv1d-circular-stride2": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, padding_mode="circular"),
    "conv1d-same-dil2": lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_unfolded_rows_times_the_flattened_weight_are_the_convolution(case: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[case]()
    x = torch.randn(2, 3, 9) if isinstance(conv, nn.Conv1d) else torch.randn(2, 3, 9, 8)
    rows = unfold_inputs(conv, x)
    want = conv(x) - conv.bias.reshape(1, -1, *[1] * (x.dim() - 2))
    got = rows @ conv.weight.flatten(1).t()  # (N·positions, out)
    assert torch.allclose(got, want.flatten(2).transpose(1, 2).reshape(-1, 4), atol=1e-5)
    assert torch.equal(unfold_inputs(conv, x[0]), rows[: rows.shape[0] // 2])  # unbatched input


def test_conv_statistics_equal_a_hand_im2col_computation() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)
    batches = [torch.randn(2, 3, 9, 8), torch.randn(1, 3, 9, 8)]
    target = PruneTarget("conv", conv)
    stats = collect_statistics([target], (FeatureNormStats, HessianStats), lambda: [conv(x) for x in batches])
    columns = torch.cat([_im2col(x, 3, 2, 1, 2) for x in batches])  # (tokens, 3·3·3)
    by_unfold = torch.cat([F.unfold(F.pad(x, [1] * 4), 3, dilation=2, stride=2) for x in batches[:1]])
    assert torch.equal(columns[: by_unfold.shape[-1] * 2], by_unfold.transpose(1, 2).reshape(-1, 27))
    norms, hessian = stats["conv.weight"][FeatureNormStats], stats["conv.weight"][HessianStats]
    assert int(norms.count) == int(hessian.count) == columns.shape[0] == 3 * 4 * 3  # 3 images of 4×3 positions
    assert torch.allclose(norms.feature_norms(), columns.norm(dim=0))
    assert torch.allclose(hessian.hessian(), 2 / columns.shape[0] * columns.t() @ columns, atol=1e-5)


# --- the digits CNN, one-shot with calibration data -------------------------------------------


def test_the_digits_cnn_is_pruned_one_shot_by_the_callback_on_its_training_batches() -> None:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(arch="cnn", hidden=32)
    callback = OneShotPruning("sparsegpt", 0.5, num_samples=64, progress=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match=r"calibrated in one whole-model pass \(no block list found\)"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert callback.report is not None
    names = ["model.conv1.weight", "model.conv2.weight", "model.fc1.weight"]
    assert [layer.name for layer in callback.report.layers] == names
    assert [layer.sparsity for layer in callback.report.layers] == [0.5, 0.5, 0.5]  # conv1: 32 rows × 1·3·3 inputs
    assert not (module.model.classifier.weight == 0).any()
