"""samf.py: CLI and bad input, Eq. 5-12 against einsum, the answer never reaching F_fused, DINO's EMA teacher, InfoNCE by
hand, every stage through main() with exact resume, SAMF and Ao2D training a step, predict on a written NIfTI, the
paper preset's parameter counts on the meta device, and a learning test. Tiny shapes: 8 x 32 x 32 phantoms, 4 slices."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import StopAfter, write_meta_checkpoint
import torch
import torch.nn.functional as F

import data
import samf

TINY = ["--preset=cpu", "--device=cpu", "--shape=8,32,32", "--n_slices=4", "--vit_img=32", "--vit_patch=16",
        "--vit_dim=32", "--vit_depth=1", "--vit_heads=2", "--agg_depth=1", "--agg_heads=2", "--dino_batch=4",
        "--dino_local=2", "--dino_local_size=16", "--dino_hidden=32", "--dino_bottleneck=16", "--dino_out=64",
        "--warmup_batch=4", "--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--vocab_size=320",
        "--n_train=6", "--n_val=4", "--n_test=2", "--batch_size=4", "--grad_accum=2", "--max_new_tokens=4",
        "--num_workers=0", "--dino_iters=2", "--warmup_iters=2", "--max_iters=2", "--eval_interval=1", "--prompt_iters=0",
        "--label_iters=2"]


def cfg_of(argv):
    return samf.parse_config(argv, samf.DEFAULTS, samf.PRESETS)


def tiny_model(fusion="samf"):
    torch.manual_seed(0)
    return samf.build_model(cfg_of(TINY + [f"--fusion={fusion}"]))


# ----------------------------------------------------------------------------- CLI, bad input, sizes

def test_cli_and_presets():
    cfg = cfg_of(["--preset=cpu", "--shape", "32,64,64", "--fusion=ao2d", "--freeze_vit=true"])
    assert cfg["shape"] == (32, 64, 64) and cfg["fusion"] == "ao2d" and cfg["freeze_vit"] is True
    assert cfg["vit_stem"] == "conv" and cfg_of(["--preset=paper"])["vit_stem"] == "patch"
    with pytest.raises(SystemExit, match="valid keys"):
        cfg_of(["--no_such_key=1"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--question: no 'Choices"):
        samf.parse_choices("Is there a pleural effusion?")
    with pytest.raises(ValueError, match="four options A-D"):
        samf.parse_choices("Which? Choices: A. x B. y C. z")
    assert samf.parse_choices("Which? Choices: A. Lung nodule B. Cardiomegaly C. Emphysema D. Atelectasis")["B"] == "Cardiomegaly"
    with pytest.raises(ValueError, match="letter X in A-D"):
        samf.answer_letter("E. Cardiomegaly")
    assert samf.answer_letter("C. Emphysema") == "C"
    with pytest.raises(ValueError, match="--n_slices=12: the volume has only 8 axial slices"):
        samf.check_config(cfg_of(TINY + ["--n_slices=12"]))
    with pytest.raises(ValueError, match="--n_slices=4: the volume has only 3"):
        samf.centre_slices(torch.zeros(1, 1, 3, 32, 32), 4, 32)


def test_cli_bad_flag_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "samf.py", "--preset=cpu", "--n_slices=99"], capture_output=True, text=True,
                       cwd=Path(samf.__file__).parent)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --n_slices=99: the volume has only 32 axial slices (--shape)"]


def test_dino_checkpoint_of_another_width_is_an_error(tmp_path):
    samf.main(TINY + ["--stage=dino", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"dino.pt: trained with --vit_dim=32; this run has --vit_dim=48"):
        samf.main(TINY + ["--stage=finetune", "--vit_dim=48", f"--out_dir={tmp_path}"])


def test_paper_preset_parameter_counts_on_meta():
    c = samf.main(["--preset=paper", "--device=cpu", "--param_counts=true"])
    assert 85e6 < c["f_2d"] < 87e6  # ViT-B/16 without a head: 85.8M
    assert 14e6 < c["f_3d"] < 15e6  # 2 layers of 768 (7.1M each) + CLS + positions
    assert 3.7e9 < c["decoder"] < 3.9e9  # Phi-3-mini's shape: 3.8B
    w = lambda i, o: i * o + o  # a Linear's weight and bias
    assert c["fusion"] == 2 * w(768, 3072) + w(3072, 3072) + w(3 * 3072, 3072)  # W_2d, W_3d, W_text, W_fusion


# ----------------------------------------------------------------------------- the paper's equations

def test_eq5_to_12_against_einsum():
    torch.manual_seed(0)
    B, S, T, C, D, d = 2, 5, 7, 6, 8, 4
    z2, z3, text = torch.randn(B, S, C), torch.randn(B, C), torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # a padded question
    for ao2d in (False, True):
        m = samf.SAMF(c_vis=C, d_text=D, d_proj=d, dim=3, ao2d=ao2d)
        fused, F2, att = m(z2, z3, text, mask)
        P2, P3, Pt = m.W_2d(z2), m.W_3d(z3), m.W_text(text)
        alpha = torch.einsum("bsd,bd->bs", P2, P3).div(2).softmax(1)  # sqrt(d) = 2
        beta = torch.einsum("btd,bd->bt", Pt, P3).div(2).masked_fill(~mask, -1e9).softmax(1)
        parts = [P3, torch.einsum("bs,bsd->bd", alpha, P2), torch.einsum("bt,btd->bd", beta, Pt)]
        torch.testing.assert_close(att["alpha"], alpha)
        torch.testing.assert_close(att["beta"], beta)
        assert att["alpha"].shape == (B, S) and att["beta"].shape == (B, T) and F2.shape == (B, S, d)
        assert att["beta"][1, 4:].abs().max() == 0  # padding gets no weight
        if ao2d:
            gamma = torch.einsum("btd,bsd->bts", Pt, P2).div(2).softmax(2)  # over slices
            torch.testing.assert_close(att["gamma"], gamma)
            torch.testing.assert_close(att["gamma"].sum(2), torch.ones(B, T))
            n = mask.sum(1, keepdim=True)
            parts.append(torch.einsum("bt,bts,bsd->bd", mask / n, gamma, P2))  # Eq. 11: 1/T sum_t sum_s
        torch.testing.assert_close(fused, m.W_fusion(torch.cat(parts, -1)))
        assert fused.shape == (B, 3)


@pytest.mark.parametrize("fusion", samf.FUSIONS)
def test_answer_never_reaches_f_fused(fusion):
    model, enc = tiny_model(fusion), _tiny_enc()
    q = "Which of the following findings is present in this scan? Choices: A. Cardiomegaly B. Emphysema C. Atelectasis D. Lung nodule"
    vol = torch.rand(2, 1, 8, 32, 32)
    seen = []
    model.fusion.register_forward_hook(lambda mod, inp, out: seen.append(out[0].detach()))
    losses = [model(vol, None, *samf.tokenize([(q, a)] * 2, enc, 256)).item() for a in ("A. Cardiomegaly", "D. Lung nodule")]
    assert losses[0] != losses[1]  # the answers differ, so the loss does
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)  # F_fused does not


def _tiny_enc():
    import data
    return data.train_bpe([samf.INSTRUCTION, "Which of the following findings Choices: A. B. C. D. Cardiomegaly "
                           "Emphysema Atelectasis Lung nodule"] * 3, 300)


def test_dino_teacher_is_an_ema_and_gets_no_gradient():
    cfg = cfg_of(TINY)
    torch.manual_seed(0)
    dino = samf.build_dino(cfg)
    for p in dino.teacher.parameters():
        p.data += 0.1 * torch.randn_like(p)  # teacher != student, so the EMA is visible
    opt = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    loss = dino(torch.rand(4, 1, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in [*dino.teacher.parameters(), *dino.teacher_head.parameters()])
    assert any(p.grad.abs().sum() > 0 for p in dino.student.parameters())
    assert dino.center.abs().sum() > 0  # the centre moved toward the teacher's mean output
    opt.step()
    old = [p.clone() for p in dino.teacher.parameters()]
    dino.update_teacher(0.9)
    for t_new, t_old, s in zip(dino.teacher.parameters(), old, dino.student.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)


def test_info_nce_by_hand():
    u, v, tau = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [0.0, -1.0]]), 0.5
    un = [[1, 0], [0, 1]]
    vn = [[0.6, 0.8], [0, -1]]
    sim = [[sum(a * b for a, b in zip(x, y)) / tau for y in vn] for x in un]  # [[1.2, 0], [1.6, -2]]
    row = sum(-sim[i][i] + math.log(sum(math.exp(s) for s in sim[i])) for i in range(2)) / 2
    col = sum(-sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in range(2))) for i in range(2)) / 2
    assert samf.info_nce(u, v, tau).item() == pytest.approx((row + col) / 2, abs=1e-6)


def test_warmup_views_come_from_different_planes():
    cfg = cfg_of(TINY)
    torch.manual_seed(0)
    warm = samf.build_warmup(cfg)
    vol = torch.rand(3, 1, 8, 32, 32)
    loss = warm(vol)
    loss.backward()
    assert all(p.grad is None for p in warm.f_2d.parameters())  # f_2d frozen
    assert all(p.grad is not None for p in warm.f_3d.parameters())
    coronal = samf.plane_slices(vol, 1, 2, 4, 32)
    torch.testing.assert_close(coronal[:, 0], torch.nn.functional.interpolate(vol[:, 0, :, 2][:, None], size=(32, 32),
                                                                              mode="bilinear", align_corners=False)[:, 0])


# ----------------------------------------------------------------------------- main(): stages, resume, predict, learning

@pytest.mark.parametrize("stage", samf.STAGES)
def test_each_stage_resumes_exactly(stage, tmp_path, monkeypatch):
    iters = {"dino": "--dino_iters=4", "warmup": "--warmup_iters=4", "finetune": "--max_iters=4"}[stage]
    argv = TINY + [f"--stage={stage}", iters, "--eval_interval=2", "--n_test=1", "--max_new_tokens=1"]
    real_save, name = samf.save_checkpoint, samf.CKPT[stage]

    def save_and_keep(path, state):  # keep the iteration-2 checkpoint of the straight run
        real_save(path, state)
        if state["iter_num"] == 2:
            shutil.copy(path, tmp_path / "mid.pt")
    monkeypatch.setattr(samf, "save_checkpoint", save_and_keep)
    samf.main(argv + [f"--out_dir={tmp_path / 'a'}"])
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "mid.pt", tmp_path / "b" / name)
    if stage == "finetune":
        shutil.copy(tmp_path / "a" / "bpe.tiktoken", tmp_path / "b" / "bpe.tiktoken")
    samf.main(argv + [f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("a", "b"))
    assert a["iter_num"] == b["iter_num"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0)


def test_ctrl_c_saves_then_stops_the_run(tmp_path, monkeypatch):
    """Ctrl-C in the DINO stage saves its checkpoint and ends the run (run(main) -> exit code 130): the warm-up and
    fine-tuning stages must not start on a cut-short f_2d."""
    with monkeypatch.context() as mp:
        mp.setattr(samf, "StopOnSigint", StopAfter)
        with pytest.raises(data.Interrupted, match="continue with --init_from=resume"):
            samf.main(TINY + ["--dino_iters=4", f"--out_dir={tmp_path}"])
    assert torch.load(tmp_path / samf.CKPT["dino"], weights_only=True)["iter_num"] == 2
    assert not (tmp_path / samf.CKPT["warmup"]).exists()
    # the command it names finishes DINO from its checkpoint, then runs the two later stages from scratch
    samf.main(TINY + ["--dino_iters=4", f"--out_dir={tmp_path}", "--init_from=resume"])
    assert torch.load(tmp_path / samf.CKPT["dino"], weights_only=True)["iter_num"] == 4
    for stage in ("warmup", "finetune"):
        assert torch.load(tmp_path / samf.CKPT[stage], weights_only=True)["iter_num"] == 2, stage


def test_a_stage_cut_short_is_not_taken_as_done(tmp_path, monkeypatch):
    """A plain re-run after Ctrl-C in DINO trains DINO again instead of warming up on the cut-short f_2d."""
    with monkeypatch.context() as mp:
        mp.setattr(samf, "StopOnSigint", StopAfter)
        with pytest.raises(data.Interrupted):
            samf.main(TINY + ["--dino_iters=4", f"--out_dir={tmp_path}"])
    samf.main(TINY + ["--dino_iters=4", f"--out_dir={tmp_path}"])
    assert torch.load(tmp_path / samf.CKPT["dino"], weights_only=True)["iter_num"] == 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All three stages through one stage-less main() call, Ao2D."""
    out = tmp_path_factory.mktemp("run")
    res = samf.main(TINY + ["--fusion=ao2d", f"--out_dir={out}"])
    return out, res


def test_all_stages_run_and_report(trained):
    out, res = trained
    assert {p.name for p in out.iterdir()} >= {"dino.pt", "warmup.pt", "ckpt.pt", "metrics.json", "samples.txt", "log.jsonl",
                                               "log_dino.jsonl", "log_warmup.jsonl"}
    assert set(res["stage_seconds"]) == {"dino", "warmup", "finetune"}
    m = json.loads((out / "metrics.json").read_text())
    assert {"model", "zero_visual", "chance", "prevalence_prior"} <= set(m["mcq"])
    assert {"precision", "recall", "f1", "accuracy"} <= set(m["mcq"]["model"]) and "bleu1" in m["report"]["model"]
    for name, stage in (("log_dino.jsonl", "dino"), ("log_warmup.jsonl", "warmup"), ("log.jsonl", "finetune")):
        recs = [json.loads(l) for l in (out / name).read_text().splitlines()]
        assert {r["stage"] for r in recs} == {stage}
        assert all(r["samples_per_s"] > 0 and r["tflops"] > 0 and 0 <= r["data_frac"] <= 1 for r in recs)  # StepTimer
    ck = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert ck["fusion.W_fusion.weight"].shape == (32, 4 * 32)  # Ao2D: four parts (Eq. 12)


def test_samf_trains_a_step_and_freezing_flags_freeze(tmp_path, monkeypatch):
    real_train, start = samf.train, {}

    def keep_start(cfg, stage, model, *a, **k):
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(cfg, stage, model, *a, **k)
    monkeypatch.setattr(samf, "train", keep_start)
    samf.main(TINY + ["--stage=finetune", "--max_iters=1", "--freeze_vit=true", "--n_test=1", f"--out_dir={tmp_path}"])
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert after["fusion.W_fusion.weight"].shape == (32, 3 * 32)  # SAMF: three parts (Eq. 10)
    assert all(torch.equal(start[k], after[k]) for k in start if k.startswith("f_2d."))  # frozen
    for k in ("f_3d.cls", "fusion.W_3d.weight", "fusion.W_text.weight", "decoder.output.weight"):
        assert not torch.equal(start[k], after[k]), k  # trained


def test_mcq_metrics_by_hand():
    m = samf.mcq_metrics(["A. x", "B. y", "nothing", "A."], ["A. x", "A. x", "C. z", "B. y"])
    assert m["accuracy"] == 0.25
    # A: tp 1, predicted 2, true 2 -> P 0.5 R 0.5 F 0.5; B: tp 0 (P 0, R 0); C: never predicted, R 0; D: absent
    assert m["precision"] == pytest.approx(0.5 / 4) and m["recall"] == pytest.approx(0.5 / 4) and m["f1"] == pytest.approx(0.5 / 4)


def test_predict_on_a_written_nifti(trained, tmp_path, capsys):
    out, _ = trained
    hu = np.full((40, 40, 24), -1000, np.int16)
    hu[8:32, 10:30, 4:20] = 40
    nib.save(nib.Nifti1Image(hu, np.diag([9.0, 9.0, 15.0, 1.0])), tmp_path / "scan.nii.gz")
    q = "Which of the following findings is present in this scan? Choices: A. Cardiomegaly B. Emphysema C. Atelectasis D. Lung nodule"
    answer = samf.main([f"--out_dir={out}", "--init_from=resume", f"--predict={tmp_path / 'scan.nii.gz'}", f"--question={q}"])
    printed = capsys.readouterr().out
    assert isinstance(answer, str) and answer in printed
    assert re.search(r"ranked \(the likeliest of the four offered answers\): (A\. Cardiomegaly|B\. Emphysema|"
                     r"C\. Atelectasis|D\. Lung nodule)\n", printed)
    from PIL import Image
    assert Image.open(out / "scan_attention.png").size == (4 * 64, 64 + 2 * 50)  # slices, alpha and gamma bars
    with pytest.raises(ValueError, match="--question: no 'Choices"):
        samf.main([f"--out_dir={out}", "--init_from=resume", f"--predict={tmp_path / 'scan.nii.gz'}", "--question=Is it?"])


def test_finetune_learns_a_tiny_problem(tmp_path):
    samf.main(TINY + ["--stage=finetune", "--max_iters=60", "--eval_interval=30", "--learning_rate=1e-2", "--n_test=1",
                      "--max_new_tokens=1", f"--out_dir={tmp_path}"])
    logs = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    # the report template: from ~ln(vocab) = 5.8 nats per token at initialisation to well under half of it
    assert logs[-1]["val_loss_report"] < 0.45 * math.log(320) and logs[-1]["val_loss_report"] < logs[0]["val_loss_report"]
    assert logs[-1]["train_loss"] < logs[0]["train_loss"]


# ----------------------------------------------------------------------------- --prompt_iters: the findings token

def test_answer_rate_by_hand():
    q = "Which of the following findings is present in this scan? Choices: "
    items = [{"name": f"s{i}", "labels": torch.zeros(18), "questions": [{"kind": "choice", "question": q + opts, "answer": a}]}
             for i, (opts, a) in enumerate([
                 ("A. Cardiomegaly B. Emphysema C. Atelectasis D. Lung nodule", "A. Cardiomegaly"),
                 ("A. Emphysema B. Cardiomegaly C. None of these D. Atelectasis", "C. None of these"),
                 ("A. Cardiomegaly B. Lung nodule C. Emphysema D. Hiatal hernia", "B. Lung nodule")])]
    assert samf.answer_rate(items) == {"Cardiomegaly": 1 / 3, "Emphysema": 0.0, "Atelectasis": 0.0, "Lung nodule": 0.5,
                                       "None of these": 1.0, "Hiatal hernia": 0.0}


def test_findings_token_is_the_scans_own_calls_at_test_time():
    """In training the token carries the labels of the readable findings (teacher forcing); in eval mode it is the
    label head's calls on z_2d whatever labels are passed, so labels cannot reach an answer at test time."""
    torch.manual_seed(0)
    model = samf.build_model(cfg_of(TINY + ["--max_iters=4", "--prompt_iters=2"]))
    model.readable[[2, 12]] = 1.0
    enc, vol = _tiny_enc(), torch.rand(2, 1, 8, 32, 32)
    y1, y2 = torch.zeros(2, 18), torch.ones(2, 18)
    text = samf.tokenize([(samf.INSTRUCTION, "No findings.")] * 2, enc, 256)
    model.eval()
    q_ids, q_mask = text[:2]
    vis, _ = model.visual_tokens(vol, q_ids, q_mask)
    calls = (model.label_head(model.encode(vol)[0].flatten(1)) >= 0).float()
    assert vis.shape[1] == model.n_visual == 1 + 4 + 1
    torch.testing.assert_close(vis[:, -1], model.label_embed(calls * model.readable))
    torch.testing.assert_close(model(vol, y1, *text), model(vol, y2, *text), atol=0, rtol=0)
    model.train()
    vis1, _ = model.visual_tokens(vol, q_ids, q_mask, labels=y2)
    torch.testing.assert_close(vis1[:, -1], model.label_embed(model.readable.expand(2, -1)))  # only readable findings
    assert model(vol, y1, *text) != model(vol, y2, *text)


def test_fit_findings_keeps_the_readable_finding_only(monkeypatch):
    """The slice embeddings (here the same vector on every slice) separate finding 2 (cardiomegaly) and are noise for
    the others: only it becomes readable, and its calls follow it on the validation scans."""
    torch.manual_seed(0)
    model = samf.build_model(cfg_of(TINY + ["--max_iters=4", "--prompt_iters=2"]))
    g = torch.Generator().manual_seed(0)

    def scans(n):
        y = (torch.rand(n, 18, generator=g) < 0.4).float()
        z = torch.randn(n, 32, generator=g)
        z[:, 0] += 4 * y[:, 2]
        return [{"labels": y[i], "volume": z[i].view(1, 1, 1, 32)} for i in range(n)]
    monkeypatch.setattr(model, "encode", lambda v: (v[:, 0, 0].expand(-1, 4, -1), v[:, 0, 0, 0]))  # z_2d, z_3d
    train_ds, val_ds = scans(200), scans(40)
    cache = samf.fit_findings(model, train_ds, val_ds, "cpu")
    assert cache.shape == (200, 4 + 1, 32)
    torch.testing.assert_close(cache[:, -1], torch.stack([it["volume"][0, 0, 0] for it in train_ds]))
    assert model.readable.nonzero().flatten().tolist() == [2]
    zv, yv = torch.stack([it["volume"][0, 0, 0] for it in val_ds]), torch.stack([it["labels"] for it in val_ds])
    calls = (model.label_head(zv.repeat(1, 4)) >= 0).float()  # z_2d (n, 4, 32) flattened
    assert (calls[:, 2] == yv[:, 2]).float().mean() >= 0.95


def test_prompt_phase_freezes_the_encoder_and_resumes_exactly(tmp_path, monkeypatch):
    """The findings phase (steps 2-3) first trains f_2d on the labels, then freezes f_2d and f_3d. Resumed where it
    starts (step 2) it trains f_2d again, resumed inside it (step 3) it does not: both end where the straight run does."""
    argv = TINY + ["--stage=finetune", "--max_iters=4", "--prompt_iters=2", "--eval_interval=1", "--n_test=2",
                   "--max_new_tokens=1"]
    real_save = samf.save_checkpoint

    def save_and_keep(path, state):
        real_save(path, state)
        if state["iter_num"] in (2, 3):
            shutil.copy(path, tmp_path / f"mid{state['iter_num']}.pt")
    monkeypatch.setattr(samf, "save_checkpoint", save_and_keep)
    res = samf.main(argv + [f"--out_dir={tmp_path / 'a'}"])
    assert {"answer_rate_prior", "prevalence_prior", "shuffled_visual"} <= set(res["mcq"]) and res["n_visual"] == 1 + 4 + 1
    for at in (2, 3):
        (tmp_path / f"b{at}").mkdir()
        shutil.copy(tmp_path / f"mid{at}.pt", tmp_path / f"b{at}" / "ckpt.pt")
        shutil.copy(tmp_path / "a" / "bpe.tiktoken", tmp_path / f"b{at}" / "bpe.tiktoken")
        samf.main(argv + [f"--out_dir={tmp_path / f'b{at}'}", "--init_from=resume"])
    mid2, mid3, a, b2, b3 = (torch.load(p, weights_only=True)["model"] for p in (
        tmp_path / "mid2.pt", tmp_path / "mid3.pt", *(tmp_path / d / "ckpt.pt" for d in ("a", "b2", "b3"))))
    for k in a:
        torch.testing.assert_close(a[k], b2[k], atol=0, rtol=0)
        torch.testing.assert_close(a[k], b3[k], atol=0, rtol=0)
        if k.startswith(("f_2d.", "f_3d.")):
            assert torch.equal(a[k], mid3[k]), k  # frozen in the findings phase, after the label steps
            assert torch.equal(a[k], mid2[k]) == k.startswith("f_3d."), k  # f_2d trained on the labels, f_3d not
    assert not torch.equal(a["decoder.output.weight"], mid2["decoder.output.weight"]) and "readable" in a
    with pytest.raises(ValueError, match="--prompt_iters=4: must be below --max_iters=4"):
        samf.check_config(cfg_of(TINY + ["--max_iters=4", "--prompt_iters=4"]))


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_feat_noise_perturbs_the_cached_features_in_training_only(noise, tmp_path, monkeypatch):
    """--feat_noise: every findings-phase training batch is the cache of the scans' z_2d, z_3d plus Gaussian noise of
    that std (none at 0); evaluation encodes the volume itself, without noise."""
    cache, fed = [], []
    real_fit, real_forward = samf.fit_findings, samf.SAMFModel.forward
    monkeypatch.setattr(samf, "fit_findings", lambda *a, **k: cache.append(real_fit(*a, **k)) or cache[-1])

    def forward(self, volume, labels, *texts):
        if volume.dim() == 3:
            fed.append(volume.clone())
        return real_forward(self, volume, labels, *texts)
    monkeypatch.setattr(samf.SAMFModel, "forward", forward)
    samf.main(TINY + ["--stage=finetune", "--max_iters=4", "--prompt_iters=2", "--n_test=2", "--max_new_tokens=1",
                      f"--feat_noise={noise}", f"--out_dir={tmp_path}"])
    assert len(cache) == 1 and len(fed) >= 2 * 2  # two steps of two micro-batches (and a FLOP count)
    rows, z = torch.cat(fed), cache[0]
    gap = (rows[:, None] - z[None]).flatten(2).pow(2).mean(-1).min(1).values.sqrt()  # to the nearest cached scan
    if noise:
        assert (gap > 0.3).all() and gap.mean() == pytest.approx(noise, rel=0.3)
    else:
        assert (gap == 0).all()


def test_letter_matches_text_and_the_mcq_margins(trained):
    q = "Which of the following findings is present in this scan? Choices: A. Emphysema B. Cardiomegaly " \
        "C. Lung nodule D. None of these"
    assert samf.letter_matches_text(["B. Cardiomegaly", "A. Cardiomegaly", "B.", " D. None of these"], [q] * 4) == 0.5
    m = json.loads((trained[0] / "metrics.json").read_text())
    for read in ("model", "ranked"):  # greedy decoding, the likeliest offered answer: each minus its baselines
        for k, (d, lo, hi) in m["mcq_margin"][read].items():
            assert d == pytest.approx(m["mcq"][read]["accuracy"] - m["mcq"][k]["accuracy"]) and lo <= hi
    blind = set(m["mcq"]) - {"model", "zero_visual", "shuffled_visual", "ranked", "ranked_zero_visual",
                             "ranked_shuffled_visual"}
    assert set(m["mcq_margin"]["model"]) == blind | {"zero_visual", "shuffled_visual"} and len(blind) == 4
    assert set(m["mcq_margin"]["ranked"]) == blind | {"ranked_zero_visual", "ranked_shuffled_visual"}
    assert 0 <= m["mcq_letter_matches_text"] <= 1


def test_rank_answers_is_the_likeliest_offered_answer():
    """The ranked answer is the option whose answer tokens have the least summed loss, computed here through the
    model's own training forward (mean loss x answer tokens); zeroing the visual tokens changes those losses."""
    model, enc, cfg = tiny_model(), _tiny_enc(), {"max_text_len": 256}
    vol = torch.rand(1, 1, 8, 32, 32)
    q = "Which of the following findings is present in this scan? Choices: A. Emphysema B. Cardiomegaly " \
        "C. Lung nodule D. None of these"
    for zero in (False, True):
        total = {}
        for c in ("A. Emphysema", "B. Cardiomegaly", "C. Lung nodule", "D. None of these"):
            q_ids, q_mask, inputs, targets = samf.tokenize([(q, c)], enc, cfg["max_text_len"])
            with torch.no_grad():
                vis, _ = model.eval().visual_tokens(vol, q_ids, q_mask)
                prefix = model.prefix(inputs, torch.zeros_like(vis) if zero else vis)
                logits = model.decoder(inputs[:, 1:], prefix)[:, prefix.shape[1]:]
            n = (targets[:, 1:] >= 0).sum().item()
            total[c] = F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-1).item() * n
        assert samf.rank_answers(model, vol, q, enc, cfg, samf.nullcontext(), zero) == min(total, key=total.get)
        assert len(set(total.values())) == 4


def test_llm_trains_lora_with_the_base_frozen_and_a_finished_run_resumes_to_its_evaluation(tmp_path):
    """--llm: a Meta-format Llama (a small random one) frozen, LoRA on it; f_2d, f_3d and the fusion train. The
    finished run resumed (--init_from=resume) trains no further and evaluates to the same answers."""
    write_meta_checkpoint(tmp_path / "llama", scaled=True)
    argv = TINY + [f"--llm={tmp_path / 'llama'}", "--lora_r=4", "--lora_alpha=8", "--max_text_len=64",
                   f"--out_dir={tmp_path / 'run'}"]
    model = samf.build_model(cfg_of(argv))
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("decoder.")} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n} != set()
    res = samf.main(argv)
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert "decoder.tok_embeddings.weight" not in state["model"] and "decoder.layers.0.attention.wq.weight" not in \
        state["model"] and state["model"]["decoder.layers.0.attention.wq.lora_B"].abs().sum() > 0  # B starts at 0
    samples = (tmp_path / "run" / "samples.txt").read_text()
    again = samf.main(argv + ["--init_from=resume"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == state["iter_num"] == 2
    assert again["mcq"] == res["mcq"] and (tmp_path / "run" / "samples.txt").read_text() == samples


def test_a_report_only_ctrate_folder_trains_every_phase(tmp_path):
    """--data=<CT-RATE layout>: reports, no multiple choice; the tokenizer, the labels and the references come from
    the split's rows (no loop over a train split that wraps around), and the findings phase trains on reports."""
    root = data.write_ctrate_layout(tmp_path / "L", 16, (24, 32, 32))
    res = samf.main([a for a in TINY if not a.startswith(("--n_train", "--n_val", "--n_test"))] +
                    [f"--data={root}", f"--out_dir={tmp_path / 'run'}", "--max_iters=4", "--prompt_iters=3"])
    assert "mcq" not in res and res["n_test"] == 5 and {"model", "zero_visual"} <= set(res["report"])
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logs] == [1, 2, 3, 4] and all("val_loss_mcq" not in r for r in logs)


def test_torchrun_two_ranks_runs_every_stage_and_the_findings_phase(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): DINO, the warm-up, fine-tuning and the findings phase (its label head
    fit on each rank, a new decoder, cached features) run; rank 0 alone writes the logs and the metrics."""
    import os
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", samf.__file__, *TINY,
           "--max_iters=4", "--prompt_iters=2", "--eval_interval=2", f"--out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [2, 4]  # one writer, not two
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"model", "ranked"} <= set(res["mcq"]) and "label_auroc" in res


def test_the_bpe_of_a_lazy_split_learns_its_multiple_choices_too(tmp_path):
    """A synthetic split too large for RAM stays lazy: its BPE must still see the multiple-choice texts (made from the
    patients, nothing rendered), so that it equals the BPE of the same split held in RAM."""
    cfg = cfg_of(TINY + [f"--out_dir={tmp_path}", "--vocab_size=400"])
    lazy = data.SyntheticCT("train", 6, shape=(8, 16, 16), seed=cfg["seed"])
    held = [lazy[i] for i in range(len(lazy))]
    a, b = (samf.get_tokenizer(cfg, ds, save=False) for ds in (lazy, held))
    assert a._mergeable_ranks == b._mergeable_ranks
    choice = next(q for q in held[0]["questions"] if q["kind"] == "choice")["question"]
    assert a.encode(choice) == b.encode(choice)
    without = data.train_bpe(data.reports_of(held) + [samf.INSTRUCTION], 400)  # what a lazy split's BPE used to be
    assert without._mergeable_ranks != a._mergeable_ranks
