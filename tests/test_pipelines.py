"""`eval --pipeline` and `generate`: published diffusers pipelines beside checkpoints, on tiny random SD3 and
FLUX.2 klein pipelines written with save_pretrained (nothing downloaded), one with a peft LoRA in the diffusers
format. Scores: a small registered reward (the real scorers need weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from benchmarks import pipelines as P  # noqa: E402
from benchmarks.generation_record import RECORD  # noqa: E402
from benchmarks.geneval import layout  # noqa: E402
from rtdmd.generate import SamplingConfig, sample_seed  # noqa: E402
from rtdmd.rewards.registry import register_reward, unregister_reward  # noqa: E402
from rtdmd.seeding import torch_generator  # noqa: E402
from rtdmd.tracking import search_runs  # noqa: E402
from tests.eval_fixtures import ckpt, one_torch_thread  # noqa: E402,F401 (fixtures)
from tests.test_cli_eval import user_error  # noqa: E402
from tiny_real import flux2_components, sd3_components  # noqa: E402

RES = 32
PROMPTS = ["a red cat", "a blue dog", "two green birds"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


@pytest.fixture(scope="module", autouse=True)
def tiny_reward():
    register_reward("tiny_red_pipe", _red, differentiable=False)
    yield
    unregister_reward("tiny_red_pipe")


@pytest.fixture()
def scored(monkeypatch):
    import benchmarks.rewards as BR

    monkeypatch.setattr(BR, "suite_rewards", lambda backend, suite: ["tiny_red_pipe"])


def flux2_pipeline_components(seed: int = 0) -> dict:
    """tiny_real's FLUX.2 with a 27-layer text encoder: the pipeline reads hidden states 9, 18 and 27 by default."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    comps = flux2_components(seed)
    torch.manual_seed(seed)
    comps["text_encoder"] = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=64, pad_token_id=30))
    return comps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import Flux2KleinPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("pipelines")
    StableDiffusion3Pipeline(**sd3_components()).save_pretrained(str(root / "sd3"))
    Flux2KleinPipeline(**flux2_pipeline_components()).save_pretrained(str(root / "flux2"))
    pipe = StableDiffusion3Pipeline(**sd3_components())
    torch.manual_seed(7)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    StableDiffusion3Pipeline.save_lora_weights(str(root / "hyper"),
                                               transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _spec(tiny, name="sd3", **kw) -> P.PipelineSpec:
    return P.PipelineSpec(str(tiny / name), resolution=RES, **kw)


def _images(folder, n_prompts, k):
    return np.stack([layout.load_image(layout.image_path(folder, i, j)) for i in range(n_prompts) for j in range(k)])


def test_each_image_has_its_own_seeded_generator(tiny, tmp_path):
    """Images depend on (seed, prompt index, image number) only: not on the batch they were generated in."""
    model = P.describe_pipeline(_spec(tiny, batch_size=3))
    sc = model.sampling(type("O", (), {"steps": 2, "guidance": 2.0})())
    meta = [{"prompt": p} for p in PROMPTS]
    todo = [(i, k) for i in range(3) for k in range(2)]
    cache: dict = {}
    assert P.generate_images(model, meta, tmp_path / "a", sc, 0, todo, "cpu", cache, progress=False) == 6
    model.spec.batch_size = 1
    P.generate_images(model, meta, tmp_path / "b", sc, 0, todo[::-1], "cpu", cache, progress=False)
    a, b = _images(tmp_path / "a", 3, 2), _images(tmp_path / "b", 3, 2)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and a.std() > 0
    with torch.no_grad():  # the stock call with the same generator gives the same image
        direct = cache["pipe"](prompt=[PROMPTS[1]], num_inference_steps=2, guidance_scale=2.0, height=RES, width=RES,
                               generator=[torch_generator(*sample_seed(0, 1, 1))], output_type="np").images[0]
    assert np.abs((direct * 255).round().astype(int) - a[3].astype(int)).max() <= 1
    assert not np.array_equal(a[2], a[3])  # another image number, another generator


def test_eval_pipeline_lora_and_checkpoint_share_an_experiment_and_a_report(cli, tiny, tmp_path, ckpt, scored,
                                                                             monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = ["--suite", "preference", "--prompts", tiny / "prompts.txt", "--images-per-prompt", "2", "--steps", "2",
              "--experiment", "side", "--quiet"]
    r = cli("eval", "--pipeline", tiny / "sd3", "--guidance", "2", "--resolution", RES, *common)
    assert r.exit_code == 0, r.output
    assert "pipeline:sd3 preference steps 2 guidance 2 seed 0: reward/tiny_red_pipe" in r.stdout and "[6 generated;" in r.stdout
    r = cli("eval", "--pipeline", tiny / "sd3", "--guidance", "2", "--resolution", RES, *common)
    assert "[0 generated;" in r.stdout  # resumed: the same folder, nothing regenerated
    r = cli("eval", "--pipeline", tiny / "sd3", "--lora", tiny / "hyper", "--guidance", "2", "--resolution", RES, *common)
    assert r.exit_code == 0 and "pipeline:sd3+lora:hyper preference" in r.stdout, r.output
    r = cli("eval", "--checkpoint", ckpt, "--guidance", "1", *common)
    assert r.exit_code == 0, r.output
    df = search_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "side", "tags.kind = 'eval'")
    runs = {row["params.method"]: row for _, row in df.iterrows()}
    assert set(runs) == {"pipeline:sd3", "pipeline:sd3+lora:hyper", "teacher"}
    base, lora = runs["pipeline:sd3"], runs["pipeline:sd3+lora:hyper"]
    assert base["tags.pipeline_class"] == "StableDiffusion3Pipeline" and base["params.sampler"] == "pipeline"
    assert lora["tags.lora"].endswith("pytorch_lora_weights.safetensors") and base["params.backend"] == "sd3"
    assert base["params.prompt_set"] == lora["params.prompt_set"] == runs["teacher"]["params.prompt_set"]
    a, b = (_images(row["tags.image_dir"], 3, 2) for row in (base, lora))
    assert not np.array_equal(a, b)  # the LoRA changes the images
    r = cli("report", "--experiment", "side", "--bootstrap", "20")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "reports/side/report.md").read_text()
    for name in ("| pipeline:sd3 | pipeline | 2 | 2 |", "| pipeline:sd3+lora:hyper | pipeline |", "| teacher |"):
        assert name in md, name


def test_scheduler_kwargs_change_the_scheduler_and_the_name(tiny, tmp_path):
    model = P.describe_pipeline(_spec(tiny, scheduler_kwargs={"shift": 1.0}))
    assert model.method == "pipeline:sd3+scheduler:shift=1.0"
    assert model.slug != P.describe_pipeline(_spec(tiny)).slug
    pipe = P.load_pipeline(model, "cpu", progress=False)
    assert pipe.scheduler.config.shift == 1.0
    with pytest.raises(P.UserError, match="has no option 'shfit'"):
        P.load_pipeline(P.describe_pipeline(_spec(tiny, scheduler_kwargs={"shfit": 1.0})), "cpu", progress=False)


def test_lora_scale_is_fused(tiny, tmp_path):
    sc = SamplingConfig(kind="pipeline", steps=2, guidance=2.0, eta=0.0)
    meta, todo = [{"prompt": p} for p in PROMPTS[:1]], [(0, 0), (0, 1)]
    runs = {}
    for name, kw in {"base": {}, "off": {"lora": str(tiny / "hyper"), "lora_scale": 0.0},
                     "full": {"lora": str(tiny / "hyper")}, "half": {"lora": str(tiny / "hyper"), "lora_scale": 0.5}}.items():
        model = P.describe_pipeline(_spec(tiny, **kw))
        P.generate_images(model, meta, tmp_path / name, sc, 0, todo, "cpu", {}, progress=False)
        runs[name] = (model, _images(tmp_path / name, 1, 2).astype(int))
    assert runs["half"][0].method == "pipeline:sd3+lora:hyper@0.5" and runs["full"][0].method == "pipeline:sd3+lora:hyper"
    assert len({m.slug for m, _ in runs.values()}) == 4
    assert np.abs(runs["off"][1] - runs["base"][1]).max() <= 1  # strength 0: the base model
    assert np.abs(runs["half"][1] - runs["base"][1]).max() > 1 and np.abs(runs["half"][1] - runs["full"][1]).max() > 1


def test_generate_a_flux2_pipeline_then_eval_images_names_the_row(cli, tiny, tmp_path, scored):
    out = tmp_path / "imgs"
    args = ["generate", "--pipeline", tiny / "flux2", "--steps", "2", "--guidance", "1", "--resolution", RES,
            "--prompts", tiny / "prompts.txt", "--max-prompts", "2", "--images-per-prompt", "1", "--out", out, "--quiet"]
    r = cli(*args)
    assert r.exit_code == 0 and "pipeline:flux2: 2 images" in r.stdout and "[2 generated" in r.stdout, r.output
    rec = json.loads((out / RECORD).read_text())
    assert rec["model"]["name"] == "pipeline:flux2" and rec["model"]["backend"] == "flux2"
    assert rec["sampler"] == {"kind": "pipeline", "steps": 2, "guidance": 1.0, "eta": 0.0} and rec["seed"] == 0
    assert rec["prompt_set"]["count"] == 3 and rec["rtdmd_bench"]["version"] and rec["rtdmd_bench"]["commit"]
    assert sorted(p.parent.parent.name for p in out.rglob("*.png")) == ["00000", "00002"]
    assert "[0 generated" in cli(*args).stdout
    user_error(cli(*args[:-3], "--seed", "5", "--out", out), f"{out / RECORD} records other seed settings")
    r = cli("eval", "--images", out, "--suite", "preference", "--images-per-prompt", "1", "--no-tracking", "--quiet")
    assert r.exit_code == 0 and "pipeline:flux2 preference steps 2 guidance 1 seed 0" in r.stdout, r.output
    user_error(cli("eval", "--images", out, "--suite", "preference", "--steps", "4", "--no-tracking"),
               "generated with steps 2")


def test_generate_a_checkpoint_records_it(cli, tmp_path, ckpt):
    out = tmp_path / "shapes"
    r = cli("generate", "--checkpoint", ckpt, "--out", out, "--max-prompts", "2", "--images-per-prompt", "1", "--quiet")
    assert r.exit_code == 0 and "teacher: 2 images" in r.stdout, r.output
    rec = json.loads((out / RECORD).read_text())
    assert rec["model"]["checkpoint"] == str(ckpt.resolve()) and rec["model"]["backend"] == "shapes"
    assert rec["prompt_set"]["name"] == "default:shapes" and rec["sampler"]["kind"] == "cps"
    assert all(json.loads((d / "metadata.jsonl").read_text())["tag"] for d in out.iterdir() if d.is_dir())


def test_pipeline_user_errors(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    user_error(cli("eval", "--pipeline", "nobody/no-such-model", "--steps", "4", "--guidance", "1"),
               "pipeline 'nobody/no-such-model' is not in the local Hugging Face cache",
               "hf download nobody/no-such-model --local-dir DIR")
    user_error(cli("eval", "--pipeline", tmp_path, "--steps", "4", "--guidance", "1"), "has no model_index.json")
    user_error(cli("eval", "--pipeline", tiny / "sd3", "--steps", "4"), "--pipeline needs --steps and --guidance")
    user_error(cli("eval", "--pipeline", tiny / "sd3", "--steps", "4", "--guidance", "1", "--eta", "0.5"), "drop it")
    user_error(cli("eval", "--pipeline", tiny / "sd3", "--steps", "4", "--guidance", "1", "--scheduler-kwargs", "{x"),
               "--scheduler-kwargs is not valid JSON")
    user_error(cli("eval", "--pipeline", tiny / "sd3", "--steps", "4", "--guidance", "1", "--lora", tmp_path / "no"),
               "is not a .safetensors file")
    user_error(cli("eval", "--lora", tiny / "hyper", "--steps", "4"), "apply to --pipeline")
    user_error(cli("eval", "--pipeline", tiny / "sd3", "--steps", "4", "--guidance", "1", "--lora-scale", "0.5"),
               "add --lora PATH")
    user_error(cli("generate", "--out", tmp_path / "x"), "exactly one model")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    model = P.describe_pipeline(_spec(tiny, lora=str(tmp_path / "bad.safetensors")))
    with pytest.raises(P.UserError, match="could not load LoRA"):
        P.load_pipeline(model, "cpu", progress=False)
