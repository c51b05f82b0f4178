"""Caption-conditioned U-Nets: the CaptionEncoder, the model's inputs, the task's caption dropout, sampling
with captions (and guidance), evaluation, and `zoo train` / `zoo sample` on the embedded shapes."""
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.data import create_dataset
from zoo.diffusion_eval import evaluate_samples
from zoo.models.diffusion import CAPTIONS, CaptionEncoder, UNetConfig
from zoo.sampling import sample
from zoo.tasks import create_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model("unet-tiny-captions").eval()


def test_tokenize_puts_a_start_token_before_the_bytes_and_pads():
    encoder = CaptionEncoder(16, max_len=6, depth=1, heads=2)
    ids = encoder.tokenize(["ab", "", "é", "abcdefgh"], torch.device("cpu"))
    P, S = encoder.PAD, encoder.START
    assert ids.tolist() == [[S, 97, 98, P, P, P], [S, P, P, P, P, P], [S, 0xC3, 0xA9, P, P, P],
                            [S, 97, 98, 99, 100, 101]]  # UTF-8 bytes; cut to max_len - 1
    states, keep = encoder(["ab", ""])
    assert states.shape == (2, 6, 16) and keep.tolist() == [[True] * 3 + [False] * 3, [True] + [False] * 5]
    assert torch.isfinite(states).all()


def test_padding_is_masked_in_the_encoder_and_the_unet(model):
    """Changing what the PAD embedding holds changes nothing: padded positions are masked everywhere."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle on a blue background", ""]
    with torch.no_grad():
        before = model(x, 500, captions)
        pad = model.caption_encoder.embed.weight[CaptionEncoder.PAD].clone()
        model.caption_encoder.embed.weight[CaptionEncoder.PAD] = torch.randn_like(pad) * 10
        after = model(x, 500, captions)
        model.caption_encoder.embed.weight[CaptionEncoder.PAD] = pad
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_the_caption_changes_the_prediction_and_trains_the_encoder(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        red, blue = model(x, 300, ["a red square"] * 2), model(x, 300, ["a blue star"] * 2)
    assert (red - blue).abs().max() > 1e-4
    model.zero_grad()
    model(x, 300, ["a red square", "a blue star"]).pow(2).mean().backward()
    assert model.caption_encoder.embed.weight.grad.abs().sum() > 0 and model.caption_encoder.position.grad.abs().sum() > 0
    model.zero_grad()


def test_bad_captions_and_configs_are_refused(model):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="cond must be a list of 2 caption strings, got a list of 1"):
        model(x, 10, ["only one"])
    with pytest.raises(ValueError, match="cond must be a list of 2 caption strings"):
        model(x, 10, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cond is missing"):
        model(x, 10)
    with pytest.raises(ValueError, match="caption_encoder needs cross_attention_dim"):
        zoo.create_model("unet-tiny", caption_encoder={})
    with pytest.raises(ValueError, match=r"caption_encoder.heads \(3\) must divide cross_attention_dim \(64\)"):
        zoo.create_model("unet-tiny-captions", caption_encoder={"heads": 3})
    with pytest.raises(ValueError, match="max_len"):
        UNetConfig.model_validate({**zoo.model_info("unet-tiny-captions")["config"], "caption_encoder": {"max_len": 0}})


def test_task_drops_captions_for_guidance_and_needs_them_in_the_data(model):
    task = create_task("diffusion", cond_dropout=1.0)
    assert task.drop_captions(["a", "b"]) == ["", ""]
    assert create_task("diffusion", cond_dropout=0.0).drop_captions(["a", "b"]) == ["a", "b"]
    torch.manual_seed(0)
    half = create_task("diffusion", cond_dropout=0.5).drop_captions([f"c{i}" for i in range(2000)])
    assert 0.45 < half.count("") / 2000 < 0.55
    shapes = create_dataset("shapes", "train", image_size=32, num_examples=8)
    task.check_data(model, shapes)
    batch = {"image": torch.stack([shapes[i]["image"] for i in range(4)]), "caption": [shapes[i]["caption"] for i in range(4)]}
    model.train()
    loss, metrics = create_task("diffusion").objective(model, batch)
    model.eval()
    assert torch.isfinite(loss) and metrics["count"] == 4
    no_captions = [{"image": shapes[0]["image"], "label": torch.tensor(0)}]
    with pytest.raises(ValueError, match="caption-conditioned but the dataset's items have no 'caption'"):
        task.check_data(model, no_captions)


def test_sample_with_captions_and_guidance(model):
    captions = ["a red circle on a white background", "a green triangle on a black background"]
    images = sample(model, 2, 2, "ddim", guidance=2.0, captions=captions, generator=torch.Generator().manual_seed(0))
    again = sample(model, 2, 2, "ddim", guidance=2.0, captions=captions, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, again)
    with pytest.raises(ValueError, match="captions are needed"):
        sample(model, 2, 2)
    with pytest.raises(ValueError, match="captions must be a list of 2 strings"):
        sample(model, 2, 2, captions="a red circle")
    with pytest.raises(ValueError, match="labels must be None"):
        sample(model, 2, 2, captions=captions, labels=[0, 1])
    class_model = zoo.create_model("unet-tiny", num_class_embeds=7)
    with pytest.raises(ValueError, match="captions must be None"):
        sample(class_model, 2, 2, captions=captions)


def test_evaluate_samples_scores_captions_against_their_images_labels(model):
    metrics = evaluate_samples(model, 3, 1)
    assert 0.0 <= metrics["conditional_accuracy"] <= 1.0 and metrics["shapes_fid"] > 0
    assert model.cond_kind == CAPTIONS


def test_zoo_train_then_sample_with_captions(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", str(ROOT / "configs/diffusion/tiny-shapes-captions.yaml"), "train.steps=2", "train.eval_every=2",
          "train.eval_batches=1", "train.batch_size=4", "train.progress=false", f"out_dir={run}"])
    main(["sample", str(run), "--n", "2", "--steps", "2", "--guidance", "2.0"])  # the run's val captions
    main(["sample", str(run), "--n", "3", "--steps", "1", "--caption", "a red square on a white background",
          "--out", str(tmp_path / "red.png")])
    assert (run / "samples.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "red.png").is_file()
    assert "samples written to" in capsys.readouterr().out
