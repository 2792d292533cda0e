"""timm's training augmentations in both loaders, on the demo JPEGs: auto-augment (``--aa``),
random erasing (``--reprob``, ``--remode``, ``--recount``) and the normalisation mean/std."""

import math
import os
import random
import re

import numpy as np
import pytest
import torch

from fastkd.data import loaders
from fastkd.data.common import IMAGENET_MEAN, IMAGENET_STD
from fastkd.data.crop_flip import CropFlip
from fastkd.data.folders import scan_split_folders
from fastkd.data.loaders import create_loaders
from fastkd.data.nvjpeg import NvJpegLoader

needs_dali = pytest.mark.skipif(not loaders.dali_available(), reason="nvidia-dali is not installed")
LOADERS = [pytest.param("dali", marks=needs_dali), "torch"]
IMAGE_AREA = 32 * 32


def first_batches(demo_dir, kind, **options):
    """The first training and validation images (every draw is the sample's own: see
    ``fastkd.data.order``)."""
    train, val = create_loaders("demo", demo_dir, batch_size=16, loader=kind, workers=0,
                                **options)
    # DALI reuses its output buffers: keep copies.
    return next(iter(train))[0].clone(), next(iter(val))[0].clone()


def pixels(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Normalised images back in [0, 1] pixel units."""
    return images * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def assert_decoded_pixels(images):
    """Float images normalised with ImageNet's statistics from 8-bit pixels."""
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    levels = pixels(images) * 255
    assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)


def is_rectangle(mask):
    rows, columns = mask.any(1).nonzero(), mask.any(0).nonzero()
    return bool(mask[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all())


@pytest.mark.parametrize("kind", LOADERS)
def test_random_erasing_zeroes_one_box_per_training_image(demo_dir, kind):
    """re_mode="const" draws nothing from torch, so the crops match those of a run without
    erasing: the images differ only inside one box each, which holds zeros (the mean colour)."""
    clean, clean_val = first_batches(demo_dir, kind)
    unerased, _ = first_batches(demo_dir, kind, re_prob=0.0, re_mode="const")
    erased, erased_val = first_batches(demo_dir, kind, re_prob=1.0, re_mode="const")
    assert torch.equal(unerased, clean)
    assert torch.equal(erased_val, clean_val)
    for image, changed in zip(erased, (erased != clean).any(dim=1)):
        assert changed.any() and is_rectangle(changed)
        assert 0.01 * IMAGE_AREA < changed.sum() < IMAGE_AREA / 2  # timm: 2% to 33% per box
        assert torch.all(image[:, changed] == 0)


@needs_dali
def test_dali_random_erasing_fills_boxes_with_normal_noise(demo_dir):
    """re_mode="pixel": standard normal values, on the batch after DALI's pipeline (which draws
    from its own generator, so the crops match those of a run without erasing); re_count=3:
    some images get several boxes."""
    clean, _ = first_batches(demo_dir, "dali")
    erased, _ = first_batches(demo_dir, "dali", re_prob=1.0, re_mode="pixel", re_count=3)
    changed = (erased != clean).any(dim=1)
    assert changed.flatten(1).any(1).all()
    assert not all(is_rectangle(mask) for mask in changed)
    noise = erased.permute(1, 0, 2, 3)[:, changed]
    assert noise.numel() > 1000
    assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1


@pytest.mark.parametrize("kind", LOADERS)
def test_mean_and_std_normalise_the_images(demo_dir, kind):
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    _, default = first_batches(demo_dir, kind)
    _, custom = first_batches(demo_dir, kind, mean=mean, std=std)
    assert_decoded_pixels(default)
    expected = (pixels(default) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(custom, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, policy", [
    pytest.param("dali", "v0", marks=needs_dali), ("torch", "v0"), ("torch", "original"),
    ("torch", "rand-m9-mstd0.5-inc1"), ("torch", "augmix-m5-w4-d2")])
def test_auto_augment_changes_training_images_only(demo_dir, kind, policy):
    clean, clean_val = first_batches(demo_dir, kind)
    augmented, augmented_val = first_batches(demo_dir, kind, auto_augment=policy)
    assert_decoded_pixels(augmented)  # the policies work on 8-bit images, before normalising
    assert (augmented != clean).flatten(1).any(1).sum() >= 4
    assert torch.equal(augmented_val, clean_val)


@needs_dali
def test_dali_image_net_policy_is_timms_v0():
    """What DALI_AUTO_AUGMENT rests on: DALI's "image_net" policy has the sub-policies,
    probabilities and magnitude levels of timm's "v0" (without timm's never-applied ops), and
    its 11 magnitude bins span what timm's levels 0..10 give each operation."""
    from nvidia.dali.auto_aug.auto_augment import get_image_net_policy
    from timm.data.auto_augment import auto_augment_policy

    from fastkd.data.dali import DALI_AUTO_AUGMENT

    dali_names = {"AutoContrast": "auto_contrast", "Color": "color", "Equalize": "equalize",
                  "Invert": "invert", "Posterize": "posterize", "Rotate": "rotate",
                  "ShearX": "shear_x", "ShearY": "shear_y", "Solarize": "solarize",
                  "SolarizeAdd": "solarize_add", "TranslateYRel": "translate_y"}
    arguments = DALI_AUTO_AUGMENT["v0"]
    assert arguments["policy_name"] == "image_net"
    dali_policy = get_image_net_policy(use_shape=True,
                                       max_translate_rel=arguments["max_translate_rel"])
    timm_policy = [[op for op in sub_policy if op.prob > 0]
                   for sub_policy in auto_augment_policy("v0", {"img_mean": (128,) * 3})]
    assert dali_policy.num_magnitude_bins == 11 and len(dali_policy.sub_policies) == 25
    assert len(timm_policy) == 25
    for timm_ops, dali_ops in zip(timm_policy, dali_policy.sub_policies):
        assert [(dali_names[op.name], op.prob) for op in timm_ops] == [
            (augmentation.name, prob) for augmentation, prob, _ in dali_ops]
        for op, (augmentation, _, level) in zip(timm_ops, dali_ops):
            if augmentation.mag_range is None:  # equalize, invert, auto-contrast
                assert op.level_fn is None
                continue
            assert level == op.magnitude
            dali_value = np.linspace(*augmentation.mag_range, 11)[level]
            timm_value = abs(op.level_fn(level, op.hparams)[0])
            # timm truncates posterize bits and solarize thresholds to integers
            assert timm_value == pytest.approx(
                dali_value, abs=1 if isinstance(timm_value, int) else 1e-9)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("policy, reason", [
    ("trivialaugment", "Unknown AA policy trivialaugment"), ("v9", "Unknown AA policy v9"),
    ("rand-m9-x3", "Unknown RandAugment config section"),
    ("augmix-m5.5", "invalid literal for int() with base 10: '5.5'")])
def test_auto_augment_strings_timm_refuses(tmp_path, kind, policy, reason):
    """Refused before any file is read: the data directory does not exist."""
    message = f"auto_augment (--aa) {policy!r} is not a timm auto-augment string ({reason})"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        create_loaders("folder", str(tmp_path / "nowhere"), batch_size=4, loader=kind,
                       auto_augment=policy)


@needs_dali
@pytest.mark.parametrize("policy", [
    "original", "v0r", "v0-mstd0.5", "rand-m9-n2", "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2"])
def test_dali_refuses_policies_it_does_not_implement(tmp_path, policy):
    message = (f"auto_augment (--aa) {policy!r}: DALI has no such policy (of timm's auto-augment "
               "strings it implements only 'v0'); --loader torch runs timm's")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        create_loaders("folder", str(tmp_path / "nowhere"), batch_size=4, loader="dali",
                       auto_augment=policy)


@pytest.mark.parametrize("options, message", [
    (dict(re_prob=1.5), r"re_prob \(--reprob\) must be in \[0, 1\], got 1.5"),
    (dict(re_prob=0.5, re_mode="zero"),
     r"re_mode \(--remode\) must be one of \('const', 'rand', 'pixel'\), got 'zero'"),
    (dict(re_prob=0.5, re_count=0), r"re_count \(--recount\) must be an integer >= 1, got 0"),
    (dict(mean=(0.5, 0.5)), r"mean and std need 3 values each \(RGB\), std > 0"),
    (dict(std=(0.5, 0.0, 0.5)), r"mean and std need 3 values each \(RGB\), std > 0")])
def test_bad_settings_refused_before_reading(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        create_loaders("folder", str(tmp_path / "nowhere"), batch_size=4, loader="torch",
                       **options)


@pytest.fixture(scope="module")
def same_split_tree(tmp_path_factory, demo_dir):
    """Two digit classes whose train and val folders hold the same 12 JPEGs."""
    import shutil

    root = tmp_path_factory.mktemp("same")
    for label in ("0", "1"):
        files = sorted(os.listdir(os.path.join(demo_dir, "train", label)))[:6]
        for split in ("train", "val"):
            os.makedirs(root / split / label)
            for name in files:
                shutil.copy(os.path.join(demo_dir, "train", label, name), root / split / label)
    return root


def whole_epoch(loader):
    return torch.cat([images.clone() for images, _ in loader])


def matched(train_images, val_images, tolerance):
    """How many training images equal some validation image within ``tolerance``."""
    return sum(bool(((val_images - image).abs().amax(dim=(1, 2, 3)) < tolerance).any())
               for image in train_images)


@pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
@pytest.mark.parametrize("kind", [*LOADERS, "nvjpeg"])
def test_crop_flip_settings_reach_every_loader(same_split_tree, kind):
    """Whole-image crops (--scale 1 1 --ratio 1 1) without flips (--hflip 0) leave each
    training image as evaluation sees it (crop_ratio 1: no resize, no crop); timm's defaults do
    not."""
    def epoch_images(crop_flip):
        options = dict(batch_size=4, image_size=32, crop_ratio=1.0, workers=0,
                       crop_flip=crop_flip)
        if kind == "nvjpeg":  # decoding on the CPU stands in for the GPU here
            folders = scan_split_folders(f"{same_split_tree}/train",
                                              f"{same_split_tree}/val")
            loaders = [NvJpegLoader(folder.samples, 2, training=training, mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD, **options)
                       for folder, training in zip(folders, (True, False))]
        else:
            loaders = create_loaders("folder", str(same_split_tree), loader=kind, **options)
        return [whole_epoch(loader) for loader in loaders]

    train, val = epoch_images(CropFlip(scale=(1, 1), ratio=(1, 1), hflip=0.0))
    assert len(train) == len(val) == 12
    assert matched(train, val, 1e-4) == 12
    train, val = epoch_images(CropFlip())
    assert matched(train, val, 1e-4) < 12


@pytest.mark.parametrize("settings, message", [
    (dict(scale=(0, 1)), "scale must be two area fractions 0 < low <= high <= 1"),
    (dict(scale=(0.9, 0.5)), "scale must be two area fractions"),
    (dict(ratio=(2, 1)), "ratio must be two aspect ratios 0 < low <= high"),
    (dict(hflip=1.5), "hflip must be a probability in [0, 1], got 1.5"),
])
def test_crop_flip_refuses_bad_ranges(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CropFlip(**settings)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("policy", [None, "v0"])
def test_training_batches_are_a_function_of_seed_epoch_and_sample(demo_dir, kind, policy):
    """What makes a mid-epoch resume exact: an epoch read from step 3 gives the batches of the
    whole epoch from step 3 on, bit for bit, with another number of workers (DALI: threads), and
    whatever this process's global generators hold; another epoch or seed gives other crops.
    With an auto-augment policy and random erasing on."""
    def epoch(workers, start_step=0, epoch=1, seed=3):
        random.seed(workers)
        torch.manual_seed(workers)
        train, _ = create_loaders("demo", demo_dir, batch_size=16, loader=kind, workers=workers,
                                  seed=seed, auto_augment=policy, re_prob=0.5)
        train.set_epoch(epoch, start_step)
        batches = [(images.clone(), labels.clone()) for images, labels in train]
        train.close()
        return batches

    whole = epoch(workers=1)
    assert len(whole) == 240 // 16
    resumed = epoch(workers=2 if kind == "torch" else 3, start_step=3)
    assert len(resumed) == len(whole) - 3
    for (images, labels), (again, labels_again) in zip(whole[3:], resumed):
        assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(epoch(workers=0, start_step=14, epoch=2)[0][0], whole[14][0])
    assert not torch.equal(epoch(workers=0, start_step=14, seed=4)[0][0], whole[14][0])


@needs_dali
def test_dali_pass_left_mid_epoch_leaves_the_next_pass_whole(demo_dir):
    """A pass left after two batches (an evaluation or epoch cut short by a stop): the next pass
    reads the epoch from its start step again, erased as before, where DALI's iterator, which
    cannot be reset mid-epoch, went on from the third batch with the erasing of the first."""
    train, _ = create_loaders("demo", demo_dir, batch_size=16, loader="dali", workers=1,
                              seed=3, re_prob=0.5)
    train.set_epoch(1, start_step=10)
    whole = [(images.clone(), labels.clone()) for images, labels in train]
    for _ in zip(range(2), train):
        pass
    again = [(images.clone(), labels.clone()) for images, labels in train]
    assert len(whole) == len(again) == 240 // 16 - 10
    for (images, labels), (images_again, labels_again) in zip(whole, again):
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)


def write_textured_pair(root, orientation=1):
    """``root/{train,val}/{a,b}/0.jpg``: one textured 48x40 JPEG (a ramp with noise, a red left
    half that makes a flip plain to see) whose EXIF orientation tag is ``orientation`` (6: shown
    turned a quarter clockwise, 40x48). Returns its pixels as stored, as PIL decodes them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
    picture = (ramp + rng.integers(-20, 20, (40, 48, 3))).clip(0, 255).astype(np.uint8)
    picture[:, :24, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    for split in ("train", "val"):
        for label in ("a", "b"):
            os.makedirs(root / split / label)
            Image.fromarray(picture).save(root / split / label / "0.jpg", quality=100, exif=exif)
    return np.asarray(Image.open(root / "train" / "a" / "0.jpg").convert("RGB"))


@needs_dali
@pytest.mark.parametrize("orientation", [1, 6])
def test_dali_decodes_the_window_crop_params_draws_and_flips_as_drawn(tmp_path, orientation):
    """Each epoch's training image is the file cropped to the window ``crop_params`` draws from
    the sample's generator, resized and flipped as ``flip_drawn`` says (PIL's crop and bilinear
    resize stand in for DALI's; a window off by a few pixels, or a flip drawn elsewhere, would be
    far outside the tolerance). A file with an EXIF orientation is read as stored, the size PIL
    reads from its header: DALI's decoder turned it by default, and the window drawn on the
    stored 48x40 fell outside the turned 40x48 image (the pipeline failed)."""
    from PIL import Image

    from fastkd.data.augment import crop_params, flip_drawn
    from fastkd.data.order import sample_seed

    decoded = write_textured_pair(tmp_path, orientation)
    train, _ = create_loaders("folder", str(tmp_path), batch_size=1, image_size=16,
                              loader="dali", workers=1, seed=5)
    flips, windows = set(), set()
    for epoch in range(6):
        train.set_epoch(epoch)
        images, labels = next(iter(train))
        slot = int(labels[0])  # one image per class: the label names the sample
        generator = torch.Generator().manual_seed(sample_seed(5, epoch, slot))
        top, left, height, width = crop_params(40, 48, generator)
        flipped = flip_drawn(generator)
        flips.add(flipped)
        windows.add((top, left, height, width))
        crop = Image.fromarray(decoded[top:top + height, left:left + width]).resize(
            (16, 16), Image.Resampling.BILINEAR)
        expected = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)
        if flipped:
            expected = expected.flip(-1)
        # Seen: below 1e-3 for the drawn window, 0.1 to 0.17 for it shifted by 2 pixels.
        assert (pixels(images[0]) - expected).abs().mean() < 0.01, epoch
    assert flips == {True, False} and len(windows) == 6  # each epoch its own draws


@needs_dali
def test_dali_evaluates_a_file_with_an_exif_orientation_as_stored_like_torchvision(tmp_path):
    """The torchvision and nvJPEG loaders decode pixels as stored; DALI's decoder turned them by
    the EXIF orientation tag: for a 48x40 file tagged 6, evaluation saw another image."""
    write_textured_pair(tmp_path, orientation=6)
    outputs = {}
    for kind in ("dali", "torch"):
        _, val = create_loaders("folder", str(tmp_path), batch_size=1, image_size=16,
                                loader=kind, workers=1, eval_batch_size=2)
        outputs[kind] = torch.cat([images.clone() for images, _ in val])
    # Seen: 0.10 as stored (the noise meets other decoders and resize kernels), 1.02 with DALI
    # turning it.
    assert (outputs["dali"] - outputs["torch"]).abs().mean() < 0.3


@needs_dali
def test_dali_policy_draws_follow_the_policys_distribution():
    """``PolicyDraws.draw`` replaces DALI's own draws (``apply_auto_augment``): a uniform
    sub-policy, each of its stages run with its probability at its magnitude, a sign even odds.
    The frequency of every outcome (operations and magnitudes of both stages; a one-stage
    sub-policy's second is the identity) over 20,000 samples' generators is its probability
    under the policy within 5 standard deviations, and so is that of the + sign."""
    import itertools

    from fastkd.data.dali import PolicyDraws, image_net_policy
    from fastkd.data.order import sample_seed

    draws = PolicyDraws(image_net_policy())
    expected = {}
    for sub_policy in draws.policy.sub_policies:
        for runs in itertools.product((False, True), repeat=len(sub_policy)):
            outcome, probability = [], 1 / len(draws.policy.sub_policies)
            for run, (operation, chance, magnitude) in zip(runs, sub_policy):
                probability *= chance if run else 1 - chance
                outcome.append((draws.operations.index(operation), magnitude or 0) if run
                               else (0, 0))
            outcome = tuple(outcome + [(0, 0)] * (draws.stages - len(outcome)))
            expected[outcome] = expected.get(outcome, 0) + probability
    count = 20_000
    seen, signs = {}, []
    for index in range(count):
        operation, magnitude, sign = draws.draw(torch.Generator().manual_seed(
            sample_seed(0, 0, index)))
        outcome = tuple(zip(operation.tolist(), magnitude.tolist()))
        seen[outcome] = seen.get(outcome, 0) + 1
        signs += [value for value, op in zip(sign.tolist(), operation.tolist()) if op]
    assert set(seen) <= set(expected)
    for outcome, probability in expected.items():
        bound = 5 * math.sqrt(probability * (1 - probability) / count)
        assert abs(seen.get(outcome, 0) / count - probability) <= bound, outcome
    assert abs(np.mean(signs) - 0.5) < 5 * math.sqrt(0.25 / len(signs))


@needs_dali
def test_dali_policy_runs_what_each_samples_generator_drew(demo_dir):
    """The policy's choices reach the pipeline beside the sample they were drawn for: the
    samples whose draws run no operation are the images of a run without the policy, bit for
    bit (same crop and flip: the policy draws after them), and most of the others differ (an
    operation at magnitude 0, such as a rotation by 0 degrees, may leave an image as it was)."""
    from fastkd.data.augment import crop_params, flip_drawn
    from fastkd.data.order import sample_seed

    def batches(policy):
        train, _ = create_loaders("demo", demo_dir, batch_size=64, loader="dali", workers=2,
                                  seed=7, auto_augment=policy)
        train.set_epoch(2, start_step=1)
        images = torch.cat([images.clone() for _, (images, _) in zip(range(2), train)])
        return images, train

    plain, _ = batches(None)
    augmented, train = batches("v0")
    unchanged, changed = [], []
    for slot, image, augmented_image in zip(train.slots, plain, augmented):
        generator = torch.Generator().manual_seed(sample_seed(7, 2, slot))
        width, height = (int(side) for side in train.sizes[slot])  # read by the pipeline
        crop_params(height, width, generator)
        flip_drawn(generator)
        operations = train.policy.draw(generator)[0]
        same = torch.equal(image, augmented_image)
        (changed if operations.any() else unchanged).append(same)
    assert len(unchanged) >= 8 and all(unchanged)  # about 1 in 7 samples run no operation
    assert sum(changed) < 0.2 * len(changed)


@pytest.mark.parametrize("policy", ["v0", "rand-m9-mstd0.5-inc1"])
def test_posterize_to_zero_bits_blackens_instead_of_failing(policy):
    """timm's levels ask for 0 bits (v0's Posterize at level 2, RandAugment's
    PosterizeIncreasing at 10), which Pillow 13 refuses: a run with --aa failed in a loader
    worker on one sample in tens. The policies take fastkd's posterize: black, as Pillow 12."""
    from PIL import Image
    from timm.data import auto_augment as timm_policies

    from fastkd.data.augment import posterize, timm_auto_augment

    transform = timm_auto_augment(policy, 32, IMAGENET_MEAN)
    operations = getattr(transform, "ops", None) or [
        operation for sub_policy in transform.policy for operation in sub_policy]
    posterizers = [op for op in operations if "Posterize" in op.name]
    assert posterizers and all(op.aug_fn is posterize for op in posterizers)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8))
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(image, 3)),
                          np.asarray(timm_policies.posterize(image, 3)))
    with pytest.raises(ValueError, match="bits must be between"):
        timm_policies.posterize(image, 0)
