"""hilt.py: CLI, token counts, Eq. 3, the Llama decoder (Meta format, LoRA, KV cache), and main() end to end."""
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_meta_checkpoint

import data
import hilt

# A tiny run: patch (8, 16, 16) so HR 64 x 64 x 32 -> 4 x 4 x 4 = 64 HR tokens and LR 32 x 32 x 16 -> 8 queries.
TINY = ["--preset=cpu", "--device=cpu", "--hr=64,64,32", "--lr=32,32,16", "--patch=8,16,16", "--vit_dim=32",
        "--vit_depth=1", "--vit_heads=2", "--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1",
        "--vocab_size=320", "--n_train=6", "--n_val=2", "--n_test=2", "--max_new_tokens=6", "--batch_size=2",
        "--grad_accum=2", "--pretrain_iters=0"]  # the cpu preset's hybrid E_V and aux label loss, no label-only phase


# ----------------------------------------------------------------------------- CLI and token counts

def cfg_of(argv):
    return hilt.parse_config(argv, hilt.DEFAULTS, hilt.PRESETS)


def test_cli_hr_is_h_w_d_with_depth_last():
    for argv in (["--hr", "512,512,256"], ["--hr=512,512,256"]):
        cfg = cfg_of(argv + ["--device=cpu", "--preset=paper"])  # the paper's patch (the cpu preset halves it)
        assert cfg["hr"] == (512, 512, 256)
        assert hilt.zyx(cfg["hr"]) == (256, 512, 512)  # the volume tensor is (z, y, x) = (D, H, W)
        patch, grid, n_visual = hilt.token_grids(cfg)
        assert patch == (16, 32, 32) and grid == (16, 16, 16) and n_visual == 64
    with pytest.raises(SystemExit, match="valid keys"):
        cfg_of(["--no_such_key=1"])
    with pytest.raises(ValueError, match="multiple of the patch"):
        hilt.token_grids(cfg_of(["--hr=500,512,256", "--device=cpu", "--preset=paper"]))


@pytest.mark.parametrize("hr", [(128, 128, 128), (128, 128, 64), (256, 256, 128), (384, 384, 192), (512, 512, 256)])
def test_decoder_sees_64_visual_tokens_at_every_hr(hr):
    """The paper-size model on the meta device (no memory): HILT and random queries give 64 tokens, all_tokens grows."""
    for mode in ("hilt", "random_queries", "all_tokens", "lr_only"):
        cfg = cfg_of(["--preset=paper", "--device=cpu", f"--mode={mode}", "--hr=" + ",".join(map(str, hr))])
        with torch.device("meta"):
            model = hilt.build_model(cfg)
            vis = model.visual_tokens(torch.empty(2, 1, *hilt.zyx(hr)))
        n_hr = math.prod(s // p for s, p in zip(hilt.zyx(hr), (16, 32, 32)))
        assert vis.shape == (2, 64 if mode != "all_tokens" else n_hr, cfg["dim"]), (mode, hr, vis.shape)


def test_eq3_is_q_plus_scaled_softmax_attention():
    q, hr = torch.randn(2, 8, 16), torch.randn(2, 64, 16)
    ref = q + torch.softmax(q @ hr.transpose(1, 2) / 4.0, -1) @ hr  # sqrt(C) = 4
    torch.testing.assert_close(hilt.hilt_attention(q, hr), ref)


@pytest.mark.parametrize("mode", hilt.MODES)
def test_modes_train_their_encoder(mode):
    cfg = cfg_of(TINY + [f"--mode={mode}"])
    model = hilt.build_model(cfg)
    x, ids = torch.rand(2, 1, *hilt.zyx(cfg["hr"])), torch.randint(0, 300, (2, 10))
    loss = model(x, ids, ids)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.n_visual == {"hilt": 8, "random_queries": 8, "all_tokens": 64, "slices2d": 64, "lr_only": 8}[mode]  # slices2d: 8 x 8 in-plane patches
    if mode == "random_queries":
        assert model.queries.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- decoder

def small_args(**kw):
    return hilt.ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                                    ffn_dim_multiplier=1.3, max_seq_len=128), **kw})


def test_decoder_ids_alone_give_logits_and_ffn_size_follows_meta():
    args = small_args()
    assert args.hidden_dim == 32 * math.ceil(int(1.3 * int(2 * 4 * 64 / 3)) / 32)  # 170 -> 221 -> 224
    dec = hilt.Decoder(args)
    assert dec(torch.randint(0, 512, (3, 7))).shape == (3, 7, 512)


def test_lora_merge_equals_unmerged():
    torch.manual_seed(0)
    dec = hilt.add_lora(hilt.Decoder(small_args()), r=4, alpha=8, dropout=0.1)
    assert {n for n, p in dec.named_parameters() if p.requires_grad} == {
        n for n, _ in dec.named_parameters() if ".lora_" in n} and len([n for n in dec.state_dict() if "lora_" in n]) == 28
    for m in dec.modules():
        if isinstance(m, hilt.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)  # B starts at zero: make the adapters matter
    dec.eval()
    ids = torch.randint(0, 512, (2, 9))
    before = dec(ids)
    base = hilt.Decoder(small_args())
    base.load_state_dict({k: v for k, v in dec.state_dict().items() if "lora_" not in k})
    assert (base(ids) - before).abs().max() > 1e-3  # the adapters change the output
    for m in dec.modules():
        if isinstance(m, hilt.LoRALinear):
            m.merge()
    torch.testing.assert_close(dec(ids), before, atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_equals_full_recomputation():
    torch.manual_seed(0)
    dec = hilt.Decoder(small_args()).eval()
    prompt, prefix = torch.randint(0, 512, (3, 5)), torch.randn(3, 4, 64)
    fast = hilt.generate(dec, prompt, prefix, max_new_tokens=20, eos_id=-1)
    slow = hilt.generate(dec, prompt, prefix, max_new_tokens=20, eos_id=-1, use_cache=False)
    assert fast.shape == (3, 20) and torch.equal(fast, slow)
    eos = int(fast[0, 3])  # a row stops at eos and is padded with it
    out = hilt.generate(dec, prompt, prefix, max_new_tokens=20, eos_id=eos)
    assert (out[0, 3:] == eos).all()
    torch.manual_seed(1)
    a = hilt.generate(dec, prompt, prefix, max_new_tokens=8, eos_id=-1, top_k=5)
    torch.manual_seed(1)
    b = hilt.generate(dec, prompt, prefix, max_new_tokens=8, eos_id=-1, top_k=5, use_cache=False)
    assert torch.equal(a, b)


def meta_rope_scaling(freq):  # Llama 3.1's apply_scaling, one frequency at a time as Meta's code loops
    wavelen = 2 * math.pi / freq
    if wavelen < 8192 / 4:
        return freq
    if wavelen > 8192 / 1:
        return freq / 8
    smooth = (8192 / wavelen - 1) / (4 - 1)
    return (1 - smooth) * freq / 8 + smooth * freq


def meta_reference_logits(sd, p, tokens):
    """Meta's Llama forward written out on its own: complex freqs_cis and view_as_complex, repeat_kv by expand."""
    B, T = tokens.shape
    H, Hkv, hd = p["n_heads"], p["n_kv_heads"], p["dim"] // p["n_heads"]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if p["use_scaled_rope"]:
        freqs = torch.tensor([meta_rope_scaling(f) for f in freqs.tolist()])
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hd/2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["norm_eps"]) * w

    def rot(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        w = lambda n: sd[f"layers.{i}.{n}.weight"]
        x = rms(h, w("attention_norm"))
        q = rot((x @ w("attention.wq").T).view(B, T, H, hd))
        k = rot((x @ w("attention.wk").T).view(B, T, Hkv, hd))
        v = (x @ w("attention.wv").T).view(B, T, Hkv, hd)
        k = k[:, :, :, None].expand(B, T, Hkv, H // Hkv, hd).reshape(B, T, H, hd)
        v = v[:, :, :, None].expand(B, T, Hkv, H // Hkv, hd).reshape(B, T, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = (q @ k.transpose(2, 3) / math.sqrt(hd) + mask).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ w("attention.wo").T
        x = rms(h, w("ffn_norm"))
        h = h + (F.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("scaled", [False, True])
def test_meta_checkpoint_loads_and_matches_meta_forward(tmp_path, scaled):
    params, sd = write_meta_checkpoint(tmp_path / "llama", scaled)
    dec, tok = hilt.load_llama(tmp_path / "llama", max_seq_len=64)
    assert set(dec.state_dict()) == set(sd) and dec.args.hidden_dim == 224
    assert tok.encode_single_token("<|begin_of_text|>") == 256 and tok.n_vocab == 512
    ids = torch.tensor([tok.encode("a chest CT")] * 2)
    logits = dec.float()(ids)
    ref = meta_reference_logits({k: v.float() for k, v in sd.items()}, params, ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    # the RoPE table equals Meta's complex freqs_cis far beyond 8192 positions, where the 3.1 scaling matters
    hd, S = 16, 20000
    freqs = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
    if scaled:
        freqs = torch.tensor([meta_rope_scaling(f) for f in freqs.tolist()])
    cis = torch.polar(torch.ones(S, hd // 2), torch.outer(torch.arange(S).float(), freqs))
    torch.testing.assert_close(hilt.precompute_rope(hd, S, 500000.0, scaled), torch.view_as_real(cis))
    assert not torch.allclose(hilt.precompute_rope(hd, S, 500000.0, not scaled), torch.view_as_real(cis))


# ----------------------------------------------------------------------------- main() end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One optimizer step through main(): checkpoint, tokenizer, metrics.json."""
    out = tmp_path_factory.mktemp("hilt") / "run"
    res = hilt.main(TINY + ["--max_iters=1", "--eval_interval=1", f"--out_dir={out}"])
    return out, res


def test_one_step_end_to_end(trained):
    out, res = trained
    assert set(res["model"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge1", "rouge2", "rougeL", "cider",
                                 "mean"}
    assert res["n_visual"] == 8 and json.loads((out / "metrics.json").read_text())["trivial"] == res["trivial"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 1 and (out / "bpe.tiktoken").is_file() and (out / "samples.txt").is_file()


def test_large_synthetic_splits_render_on_access(tmp_path, monkeypatch):
    monkeypatch.setattr(hilt, "CACHE_BYTES", 0)  # what `--hr 512,512,256` with hundreds of volumes does
    res = hilt.main(TINY + ["--max_iters=1", "--max_new_tokens=2", f"--out_dir={tmp_path}"])
    assert set(res["trivial"]) == set(res["model"]) and (tmp_path / "ckpt.pt").is_file()
    assert hilt.reports_of(hilt.get_split(hilt.parse_config(TINY, hilt.DEFAULTS, hilt.PRESETS), "val")) == \
        [hilt.get_dataset("synthetic", "val", n=2, shape=(32, 64, 64), seed=1337)[i]["report"] for i in range(2)]


def test_predict_on_a_written_nifti(trained, tmp_path, capsys):
    out, _ = trained
    hu = np.full((40, 40, 24), -1000, np.int16)  # x, y, z on disk (RAS), 9 mm voxels: a body-sized box of tissue
    hu[8:32, 10:30, 4:20] = 40
    nib.save(nib.Nifti1Image(hu, np.diag([9.0, 9.0, 15.0, 1.0])), tmp_path / "scan.nii.gz")
    report = hilt.main([f"--out_dir={out}", "--init_from=resume", f"--predict={tmp_path / 'scan.nii.gz'}"])
    assert isinstance(report, str) and report in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path, monkeypatch):
    argv = TINY + ["--max_iters=4", "--eval_interval=2", "--max_new_tokens=1", "--n_test=1", "--pretrain_iters=1"]
    real_save, saved = hilt.save_checkpoint, {}

    def save_and_keep(path, state):  # keep the iteration-2 checkpoint of the straight run
        real_save(path, state)
        if state["iter_num"] == 2:
            shutil.copy(path, tmp_path / "ckpt2.pt")
    monkeypatch.setattr(hilt, "save_checkpoint", save_and_keep)
    hilt.main(argv + [f"--out_dir={tmp_path / 'a'}"])
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "ckpt2.pt", tmp_path / "b" / "ckpt.pt")
    shutil.copy(tmp_path / "a" / "bpe.tiktoken", tmp_path / "b" / "bpe.tiktoken")
    hilt.main(argv + [f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert a["iter_num"] == b["iter_num"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0)
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["val_loss"] == json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["val_loss"]


def test_llm_trains_lora_with_the_base_frozen(tmp_path):
    write_meta_checkpoint(tmp_path / "llama", scaled=True)
    out = tmp_path / "run"
    hilt.main(TINY + [f"--llm={tmp_path / 'llama'}", "--lora_r=4", "--lora_alpha=8", "--max_iters=1",
                      "--max_text_len=48", "--max_new_tokens=2", f"--out_dir={out}"])
    state = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert "decoder.tok_embeddings.weight" not in state and "decoder.layers.0.attention.wq.weight" not in state
    assert state["decoder.layers.0.attention.wq.lora_B"].abs().sum() > 0  # B starts at 0: it trained
    assert "encoder.patch_embed.weight" in state  # the encoder and F train fully


def test_learns_a_tiny_problem(tmp_path):
    out = tmp_path / "run"
    hilt.main(TINY + ["--max_iters=60", "--eval_interval=30", "--learning_rate=1e-2", "--max_new_tokens=1",
                      "--n_test=1", f"--out_dir={out}"])
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # from ln(vocab) ~ 5.8 nats per token at initialisation to a fraction of it: the report template is learned
    assert logs[-1]["val_loss"] < 0.5 * math.log(320) and logs[-1]["train_loss"] < logs[0]["train_loss"]


# ----------------------------------------------------------------------------- issue 15: the encoder, CE, the image probe

def test_hybrid_stem_keeps_the_token_grid():
    """--encoder=hybrid puts a stride-2 CNN under E_V's blocks; the token grid (and so Eq. 3 and the 64 visual
    tokens) is the pure ViT's; the paper preset keeps the paper's pure ViT."""
    assert cfg_of(["--preset=paper", "--device=cpu"])["encoder"] == "vit"
    assert hilt.ConvStem((16, 32, 64, 128), (8, 16, 16)).cell == (1, 1, 1)  # z halves 3 times, y and x 4 times
    assert hilt.ConvStem((16, 32, 64, 128), (16, 32, 32)).cell == (1, 2, 2)  # the rest is the token embedding's
    x = torch.randn(2, 1, 32, 64, 64)
    for patch in ((8, 16, 16), (16, 32, 32)):
        grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
        vit = hilt.ViT3D(grid=grid, patch=patch, dim=32, depth=1, heads=2)
        hybrid = hilt.ViT3D(grid=grid, patch=patch, dim=32, depth=1, heads=2, stem_channels=(4, 8, 8, 16))
        assert vit(x).shape == hybrid(x).shape == (2, math.prod(grid), 32)
    cfg = cfg_of(TINY + ["--encoder=hybrid", "--label_prompt=false"])  # without the findings token: 8 visual tokens
    model = hilt.build_model(cfg)
    assert model.visual_tokens(torch.rand(2, 1, *hilt.zyx(cfg["hr"]))).shape == (2, 8, 32)
    with pytest.raises(AssertionError, match="--encoder"):
        hilt.build_model(cfg_of(TINY + ["--encoder=resnet"]))


def test_pretrain_phase_trains_the_encoder_alone_and_restarts_the_schedule():
    cfg = cfg_of(TINY + ["--encoder=hybrid"])
    torch.manual_seed(0)
    model = hilt.build_model(cfg)
    labels = torch.zeros(2, 18)
    labels[0, 2] = 1
    loss = model(torch.rand(2, 1, *hilt.zyx(cfg["hr"])), None, None, labels)  # inputs None: labels only
    loss.backward()
    z = model.features(torch.rand(2, 1, *hilt.zyx(cfg["hr"]))).detach()
    assert math.isclose(loss.item(), F.binary_cross_entropy_with_logits(model.label_head(z.mean(1)), labels).item(),
                        rel_tol=0.5)  # a BCE, not a language loss (~ln vocab)
    assert all(p.grad is None for p in model.decoder.parameters()) and model.encoder.stem.net[0].weight.grad is not None
    assert model.label_head.weight.grad.abs().sum() > 0
    cfg.update(max_iters=200, pretrain_iters=100, warmup_ratio=0.1, learning_rate=1.0)
    lrs = [hilt.get_lr(it, cfg) for it in range(200)]
    assert lrs[0] == lrs[100] == 0.1 and lrs[9] == lrs[109] == 1.0  # each phase warms up over its own 10 steps
    assert lrs[99] == pytest.approx(1 / 90) and lrs[199] == pytest.approx(1 / 90)  # and decays to ~0 at its end
    inputs, targets = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    vol = torch.rand(2, 1, *hilt.zyx(cfg["hr"]))
    model.eval()  # frozen Standardize statistics: the three calls see the same features
    lm = model(vol, inputs, targets)
    assert model(vol, inputs, targets, labels, 0.5).item() == pytest.approx(
        lm.item() + 0.5 * model(vol, None, None, labels).item(), rel=1e-5)  # the aux label loss beside it


def test_shifted_batch_pairs_reports_with_other_volumes():
    cfg = cfg_of(TINY)
    ds = [{"volume": torch.full((1, 2, 2, 2), float(i)), "labels": torch.full((18,), float(i)), "report": f"r{i}",
           "name": str(i)} for i in range(4)]
    enc = hilt.get_tokenizer(cfg, ["r0 r1 r2 r3"] * 4, save=False)
    own = hilt.get_batch(ds, [0, 1, 2, 3], enc, cfg, "cpu")
    other = hilt.get_batch(ds, [0, 1, 2, 3], enc, cfg, "cpu", shift=2)
    assert own[0].flatten(1)[:, 0].tolist() == [0, 1, 2, 3] and other[0].flatten(1)[:, 0].tolist() == [2, 3, 0, 1]
    assert torch.equal(own[1], other[1]) and torch.equal(own[3], other[3])  # the same reports and labels


def test_linear_probe_reads_a_linear_label():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] + x[:, 2] > 0.5).float()], 1)
    p = hilt.linear_probe(x[:150], y[:150], x[150:])
    assert hilt.macro_auroc(y[150:].numpy(), p.numpy())[0] > 0.95


def test_final_eval_prints_ce_beside_baselines_and_the_image_probe(trained, capsys):
    out, res = trained
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["ce"]) == {"model", "all_normal", "prevalence_random", "all_positive"}
    for m in saved["ce"].values():
        assert {"precision", "recall", "f1", "micro_f1", "per_label"} <= set(m) and len(m["per_label"]) == 18
    y = np.array([p["labels"] for p in (data.sample_patient(1337, "test", i) for i in range(2))])
    assert saved["ce"]["all_normal"]["f1"] == 0 and saved["ce"]["all_positive"]["recall"] == pytest.approx(
        np.mean(y.sum(0) > 0))  # recall 1 on every finding present in the 2 test scans, 0 on the others
    assert set(saved["image_probe"]) == {"own_volume_loss", "shuffled_volume_loss", "gap"}
    assert saved["image_probe"]["own_volume_loss"] != saved["image_probe"]["shuffled_volume_loss"]
    assert 1 <= saved["distinct_reports"] <= 2 and saved["peak_rss_mb"]["main"] > 0
    assert 0 <= saved["encoder_auroc"]["linear_probe"] <= 1 or math.isnan(saved["encoder_auroc"]["linear_probe"])


def test_lr_only_never_sees_the_hr_view():
    """--mode=lr_only (issue 15 item 5's baseline): the LR view's tokens alone; detail only HR holds cannot reach it."""
    cfg = cfg_of(TINY + ["--mode=lr_only"])
    torch.manual_seed(0)
    model = hilt.build_model(cfg).eval()
    x = torch.rand(1, 1, *hilt.zyx(cfg["hr"]))
    lr = torch.nn.functional.interpolate(x, size=hilt.zyx(cfg["lr"]), mode="trilinear", align_corners=False)
    torch.testing.assert_close(model.features(x), model.encoder(lr))  # E_V of the LR view, nothing else
    assert model.features(x).shape == (1, 8, cfg["vit_dim"])


def test_standardize_uses_running_statistics_over_scans():
    """--standardize: per position and channel, minus a running mean over scans, over a running std; a scan's output
    never depends on the other scans of its batch (no batch statistics in the output)."""
    std = hilt.Standardize(3, 2, momentum=0.5)
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 3, 2, generator=g) * 100  # a large per-position offset, small variation across scans
    a = pos + torch.randn(8, 3, 2, generator=g)
    out = std(a)  # the first batch sets the statistics
    torch.testing.assert_close(out.mean(0), torch.zeros(3, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(3, 2), atol=1e-3, rtol=0)
    b = pos + torch.randn(8, 3, 2, generator=g)
    out_b = std(b)
    torch.testing.assert_close(std.mean, 0.5 * a.mean(0) + 0.5 * b.mean(0))  # then a running mean
    std.eval()
    first, alone = std(b)[0], std(b[:1])[0]
    torch.testing.assert_close(first, alone)  # eval: frozen, per scan
    torch.testing.assert_close(out_b, std(b))  # training normalised with the statistics it had just updated
    assert std.count == 2


def test_label_prompt_is_the_truth_in_training_and_the_heads_calls_at_test():
    """--label_prompt: one more prefix token. Training feeds the true labels (teacher forcing); at test the token is
    the label head's calls on the volume's own features, so labels passed at test time change nothing."""
    cfg = cfg_of(TINY + ["--label_prompt=true"])
    torch.manual_seed(0)
    model = hilt.build_model(cfg)
    vol, ids = torch.rand(2, 1, *hilt.zyx(cfg["hr"])), torch.randint(0, 300, (2, 10))
    ones, zeros = torch.ones(2, 18), torch.zeros(2, 18)
    model.eval()
    assert model.visual_tokens(vol).shape == (2, model.n_visual + 1, cfg["dim"])
    at_test = model(vol, ids, ids)
    assert model(vol, ids, ids, ones).item() == at_test.item() == model(vol, ids, ids, zeros).item()
    z = model.features(vol)
    calls = (model.label_head(z.mean(1)) >= 0).float()
    torch.testing.assert_close(model.visual_tokens(vol)[:, -1], model.label_embed(calls))
    model.train()
    model.standardize.eval()  # keep the running statistics fixed between the two calls
    assert model(vol, ids, ids, ones).item() != model(vol, ids, ids, zeros).item()  # training: the given labels


def test_refit_label_head_is_the_linear_probe_folded_back():
    cfg = cfg_of(TINY + ["--label_prompt=true"])
    torch.manual_seed(0)
    model = hilt.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    ds = [{"volume": torch.rand(1, *hilt.zyx(cfg["hr"]), generator=g), "labels": (torch.rand(18, generator=g) < 0.3).float(),
           "report": "r", "name": str(i)} for i in range(24)]
    hilt.refit_label_head(model, ds, "cpu", hilt.nullcontext(), thresholds=False)
    x = hilt.mean_features(model, ds, "cpu", hilt.nullcontext())
    y = hilt.labels_of(ds)
    want = hilt.linear_probe(x, y, x)
    # the folded head rounds differently from the probe's standardised form (float32, w.mu cancels): up to 3e-4 on
    # some CPUs; a fold that drops the standardisation or the bias term is off by far more
    torch.testing.assert_close(torch.sigmoid(model.label_head(x)).detach(), want, atol=1e-3, rtol=1e-3)
    # with thresholds: the calls are the probe's p >= its best-F1 threshold on these scans
    hilt.refit_label_head(model, ds, "cpu", hilt.nullcontext())
    t = data.best_f1_thresholds(y.numpy(), want.numpy())
    calls = (model.label_head(x) >= 0).detach().numpy()
    near = np.abs(want.numpy() - t) < 1e-3  # a probability within float error of its threshold may go either way
    assert ((calls == (want.numpy() >= t)) | near).all()


def test_torchrun_two_ranks_train_and_rank_zero_writes(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU), the README's DDP command at tiny shapes: both ranks train, rank 0
    alone writes the log, the checkpoint and the metrics."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", hilt.__file__, *TINY,
           "--max_iters=2", "--eval_interval=1", "--grad_accum=1", f"--out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2] and (tmp_path / "run" / "metrics.json").is_file()
