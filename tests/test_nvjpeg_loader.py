"""The nvJPEG loader (``fastkd.data.nvjpeg``) on real files written with PIL: the worker-side
reader and collate, order and sharding against the torchvision loader, the device transforms
against torchvision's, reproducible augmentation, bad files. On CPU (``decode_jpeg`` with
libjpeg-turbo); the CUDA cases (nvJPEG) run where there is a GPU."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import smooth_image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from fastkd.data.augment import crop_params, flip_drawn
from fastkd.data.bad_images import BadImageError
from fastkd.data.common import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from fastkd.data.nvjpeg import (
    EncodedFileDataset,
    JpegDecoder,
    NvJpegLoader,
    collate_encoded,
    decode_images,
    flip,
    read_encoded,
    resized_crop,
    unpack,
)
from fastkd.data.order import sample_seed, train_indices
from fastkd.data.torch_loader import FileDataset, TorchLoader, image_transform

# torchvision 0.29 deprecates its image codecs (for TorchCodec) with a warning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (width, height): landscape, portrait, square, odd sides, an extreme ratio (the crop fallback).
SIZES = [(40, 30), (37, 53), (53, 37), (30, 30), (64, 48), (90, 20)]
NORMALISE = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def jpeg_bytes(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def textured(width, height, seed):
    """Smooth gradients plus noise: every crop and flip changes the pixels."""
    base = np.asarray(smooth_image(height, width, seed), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-40, 40, base.shape)
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def write_files(root, files):
    """``root/<class>/<name>`` for {"class/name": bytes}; samples sorted as ImageFolder's."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    classes = sorted({name.split("/")[0] for name in files})
    return tuple((str(root / name), classes.index(name.split("/")[0])) for name in sorted(files))


def jpeg_samples(root, count=len(SIZES), classes=3):
    files = {f"c{index % classes}/{index:02d}.jpg":
             jpeg_bytes(textured(*SIZES[index % len(SIZES)], index)) for index in range(count)}
    return write_files(root, files)


def loader(samples, num_classes=3, training=False, batch_size=4, image_size=24, device="cpu",
           **options):
    return NvJpegLoader(samples, num_classes, training=training, batch_size=batch_size,
                        image_size=image_size, crop_ratio=options.pop("crop_ratio", 0.875),
                        device=device, workers=options.pop("workers", 0), **NORMALISE,
                        **options)


def pil_chw(source):
    with Image.open(source) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())


def test_reader_ships_jpeg_bytes_and_decodes_other_formats(tmp_path):
    picture = textured(37, 53, 1)
    png, bmp = io.BytesIO(), io.BytesIO()
    picture.save(png, format="PNG")
    picture.save(bmp, format="BMP")
    complete = jpeg_bytes(picture)
    samples = write_files(tmp_path, {"a/photo.jpg": complete, "a/png-named.jpg": png.getvalue(),
                                     "b/image.bmp": bmp.getvalue(),
                                     "b/padded.jpg": complete + b"\0" * 8,
                                     "b/truncated.jpg": complete[:-100]})
    jpeg = read_encoded(samples[0][0])
    assert jpeg.dtype == torch.uint8 and jpeg.dim() == 1
    assert jpeg.numpy().tobytes() == complete
    # Not a JPEG (by content, not by name), or not ending with the end-of-image marker: PIL's.
    for path, _ in samples[1:4]:
        decoded = read_encoded(path)
        assert decoded.shape == (3, 53, 37) and torch.equal(decoded, pil_chw(path))
    with pytest.raises(OSError, match="image file is truncated"):
        read_encoded(samples[4][0])
    item = EncodedFileDataset(samples)[0]
    assert torch.equal(item[0], jpeg) and item[1:] == (0, {}, 0)


def test_collate_packs_bytes_keeps_sizes_and_merges_bad_files():
    data = [torch.arange(5, dtype=torch.uint8), torch.zeros(3, 4, 7, dtype=torch.uint8),
            torch.arange(9, 0, -1, dtype=torch.uint8), torch.ones(2, dtype=torch.uint8)]
    batch = [(data[0], 2, {"x.jpg": "OSError: a"}, 3), (data[1], 0, {}, 4),
             (data[2], 1, {"y.jpg": "OSError: b", "z.jpg": "OSError: c"}, 9), (data[3], 1, {}, 10)]
    packed, parts, labels, bad, read = collate_encoded(batch)
    assert packed.shape == (16,) and parts[0] == 5 and parts[1] is data[1]  # one tensor of bytes
    items = unpack(packed, parts)
    assert len(items) == 4 and all(torch.equal(a, b) for a, b in zip(items, data))
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 0, 1, 1]
    assert bad == {"x.jpg": "OSError: a", "y.jpg": "OSError: b", "z.jpg": "OSError: c"}
    assert read == [3, 4, 9, 10]
    assert unpack(*collate_encoded([(data[1], 0, {}, 0)])[:2])[0] is data[1]  # no JPEG at all


@pytest.mark.parametrize("device", DEVICES)
def test_order_and_shards_are_the_torchvision_loaders(tmp_path, device):
    """13 one-file classes: a label names its sample. Training: batch 2 on 2 ranks, 3 global
    batches of 4 (the 13th sample waits for another epoch); evaluation: the 6/7 shards in
    batches of 2."""
    samples = jpeg_samples(tmp_path, count=13, classes=13)
    for training in (True, False):
        for epoch in range(2):
            seen = []
            for rank in range(2):
                common = dict(training=training, batch_size=2, rank=rank, world_size=2, seed=3,
                              workers=1 if rank else 0)
                ours = loader(samples, 13, image_size=16, device=device, **common)
                reference = TorchLoader(
                    FileDataset(samples, image_transform(training, 16, crop_ratio=0.875,
                                                         **NORMALISE)), 13, **common)
                orders = []
                for each in (ours, reference):
                    each.set_epoch(epoch)
                    batches = [labels.cpu() for _, labels in each]
                    assert len(batches) == len(each) == (3 if training else [3, 4][rank])
                    orders.append(torch.cat(batches).tolist())
                assert orders[0] == orders[1]
                seen += orders[0]
            if training:  # 12 different samples of the 13
                assert len(set(seen)) == len(seen) == 12
            else:
                assert seen == list(range(13))  # evaluation: file order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("crop_ratio", [0.875, 1.25])  # 1.25: resized below the crop, padded
def test_evaluation_is_torchvisions_resize_centre_crop_normalise(tmp_path, device, crop_ratio):
    """Against torchvision's v2 transforms on the same decoded uint8 image (decode_jpeg on the
    same device; a PNG, decoded by PIL in the worker). v2 works on x / 255 and normalises with
    (x - mean) / std where the loader resizes x and applies one multiply-add: the same maths in
    another order, so float32 rounding (values up to 2.7, ulp 2.4e-7) differs by a few ulp;
    1e-5 allows that and nothing else (one grey level is 1.7e-2 in these units)."""
    files = {f"c{index % 2}/{index}.jpg": jpeg_bytes(textured(*size, index))
             for index, size in enumerate(SIZES)}
    png = io.BytesIO()
    textured(37, 53, 9).save(png, format="PNG")
    files["c1/zz.png"] = png.getvalue()
    samples = write_files(tmp_path, files)
    size = 24
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Resize(eval_resize(size, crop_ratio), antialias=True),
                            v2.CenterCrop(size), v2.Normalize(**NORMALISE)])
    expected = []
    for path, _ in samples:
        data = read_encoded(path)
        image = (decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data.dim() == 1
                 else data.to(device))
        expected.append(reference(image))
    images = torch.cat([images for images, _ in loader(samples, 2, image_size=size,
                                                        crop_ratio=crop_ratio, device=device)])
    assert images.shape == (len(samples), 3, size, size) and images.device.type == device
    torch.testing.assert_close(images, torch.stack(expected), rtol=0, atol=1e-5)


def test_crop_parameters_are_torchvisions_draws():
    """The same draws as RandomResizedCrop.get_params on the global RNG with the same seed,
    including the fallback (90x20 and 20x90, too elongated for most tries; 1x1)."""
    for seed in range(40):
        for width, height in [*SIZES, (20, 90), (1, 1), (500, 375)]:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                expected = RandomResizedCrop.get_params(torch.empty(3, height, width),
                                                        [0.08, 1.0], [3 / 4, 4 / 3])
            assert crop_params(height, width, torch.Generator().manual_seed(seed)) == expected


def test_crop_resize_and_flip_are_torchvisions():
    image = torch.from_numpy(np.asarray(textured(37, 53, 4)).transpose(2, 0, 1).copy())
    for top, left, height, width in [(3, 5, 40, 20), (0, 0, 53, 37), (10, 2, 7, 30)]:
        expected = TF.resized_crop(image.float(), top, left, height, width, [24, 24],
                                   antialias=True)
        # Both are interpolate on the same float crop: equal up to rounding (pixel units).
        torch.testing.assert_close(resized_crop(image, top, left, height, width, 24), expected,
                                   rtol=0, atol=1e-4)
    batch = torch.rand(5, 3, 4, 6)
    mask = torch.tensor([True, False, True, False, False])
    flipped = flip(batch, mask)
    for index in range(5):
        expected = TF.horizontal_flip(batch[index]) if mask[index] else batch[index]
        assert torch.equal(flipped[index], expected)


def test_training_batch_is_crop_flip_normalise_from_each_samples_generator(tmp_path):
    """A training batch equals torchvision's resized_crop / hflip / Normalize with each sample's
    crop and then flip drawn from its own (seed, epoch, sample) generator."""
    samples = jpeg_samples(tmp_path)
    train = loader(samples, training=True, batch_size=len(samples), seed=5)
    train.set_epoch(2)
    (images, labels), = list(train)
    order = train_indices(len(samples), seed=5, epoch=2, batch_size=len(samples), rank=0,
                          world_size=1)
    expected, mirror = [], []
    for index in order:
        image = decode_jpeg(read_encoded(samples[index][0]), mode=ImageReadMode.RGB).float() / 255
        generator = torch.Generator().manual_seed(sample_seed(5, 2, index))
        params = crop_params(*image.shape[1:], generator)
        mirror.append(flip_drawn(generator))
        expected.append(TF.resized_crop(image, *params, [24, 24], antialias=True))
    expected = [TF.normalize(TF.horizontal_flip(image) if flipped else image, **NORMALISE)
                for image, flipped in zip(expected, mirror)]
    assert 0 < sum(mirror) < len(samples)
    assert labels.tolist() == [samples[index][1] for index in order]
    torch.testing.assert_close(images, torch.stack(expected), rtol=0, atol=1e-5)


def test_training_batches_are_reproducible_from_the_seed(tmp_path):
    samples = jpeg_samples(tmp_path)

    def first_epochs(seed):
        train = loader(samples, training=True, seed=seed)
        epochs = []
        for epoch in range(2):
            train.set_epoch(epoch)
            epochs.append([batch for batch in train])
        return epochs

    same, again, other = first_epochs(7), first_epochs(7), first_epochs(8)
    for batch_a, batch_b in zip(same[0] + same[1], again[0] + again[1]):
        assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])
    assert not torch.equal(same[0][0][0], other[0][0][0])
    assert not torch.equal(same[0][0][0], same[1][0][0])  # and a new draw each epoch


def corrupt_tree(tmp_path):
    """a/0, a/1 (found decoding: a CMYK JPEG's headers, noise, the end marker; nvJPEG decodes
    noise without an error but refuses CMYK, libjpeg-turbo refuses the noise, and so does PIL),
    b/0, b/1 (a PNG cut short: found in the worker), b/2, b/3 (a truncated JPEG, found in the
    worker; last: its replacement wraps round)."""
    good = {f"{name}.jpg": jpeg_bytes(textured(*SIZES[index], index))
            for index, name in enumerate(["a/0", "b/0", "b/2"])}
    whole = jpeg_bytes(textured(40, 30, 11).convert("CMYK"))
    scan = whole.index(b"\xff\xda")  # start of scan: headers before, compressed data after
    scan_data = scan + 2 + int.from_bytes(whole[scan + 2:scan + 4], "big")
    noise = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    png = io.BytesIO()
    textured(40, 30, 12).save(png, format="PNG")
    files = {**good, "a/1.jpg": whole[:scan_data] + noise + b"\xff\xd9",
             "b/1.png": png.getvalue()[:200], "b/3.jpg": whole[:len(whole) // 3]}
    return write_files(tmp_path, files)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_files_are_replaced_and_reported(tmp_path, device, caplog):
    samples = corrupt_tree(tmp_path)
    val = loader(samples, 2, batch_size=3, device=device)
    assert decode_jpeg(read_encoded(samples[0][0])).shape[0] == 3  # a/0 is fine
    with caplog.at_level("WARNING", logger="fastkd.data"):
        for _ in range(2):  # the second pass skips them without reading them
            batches = [(images.cpu(), labels.cpu()) for images, labels in val]
            images = torch.cat([images for images, _ in batches])
            labels = torch.cat([labels for _, labels in batches])
            # a/1 -> b/0 (next in file order, its label); b/1 -> b/2; b/3 wraps to a/0.
            assert labels.tolist() == [0, 1, 1, 1, 1, 0]
            assert torch.equal(images[1], images[2]) and torch.equal(images[3], images[4])
            assert torch.equal(images[5], images[0])
    bad = {f"{tmp_path}/{name}" for name in ("a/1.jpg", "b/1.png", "b/3.jpg")}
    assert set(val.bad_images) == bad
    assert all(reason.startswith("OSError: ") for reason in val.bad_images.values())
    warned = [record.args[0] for record in caplog.records
              if record.msg.startswith("skipping bad image")]
    assert sorted(warned) == sorted(bad)  # each once
    # A file another rank found bad is not read, nor taken as a replacement: with b/0 readable
    # but excluded, a/1's replacement is b/2 (b/1 is bad), as are b/0's and b/1's.
    val = loader(samples, 2, batch_size=3, device=device)
    val.exclude({f"{tmp_path}/b/0.jpg": "found bad on rank 1"})
    images = torch.cat([images.cpu() for images, _ in val])
    assert all(torch.equal(images[index], images[4]) for index in (1, 2, 3))


@pytest.mark.parametrize("name", ["a/1.jpg", "b/1.png", "b/3.jpg"])  # decoding / worker
def test_bad_file_with_error_mode_raises_naming_it(tmp_path, name):
    samples = corrupt_tree(tmp_path)
    start = [path for path, _ in samples].index(f"{tmp_path}/{name}")
    val = loader(samples[start - 1:start + 1], 2, batch_size=2, bad_images="error")
    with pytest.raises(BadImageError, match=f"{tmp_path}/{name}: OSError: .+ \\(bad_images='error'"):
        list(val)


def test_odd_but_fine_files_and_output_format(tmp_path):
    """Grayscale, CMYK and 1x1 JPEGs and a PNG named .jpg decode; batches are float32
    [B, 3, S, S] in channels_last, labels int64 [B]; random_erasing gets the normalised batch."""
    photo = textured(48, 40, 2)
    png = io.BytesIO()
    photo.save(png, format="PNG")
    samples = write_files(tmp_path, {
        "a/gray.jpg": jpeg_bytes(photo.convert("L")), "a/cmyk.jpg": jpeg_bytes(photo.convert("CMYK")),
        "b/tiny.jpg": jpeg_bytes(Image.new("RGB", (1, 1), (200, 30, 60))),
        "b/png.jpg": png.getvalue(), "b/photo.jpg": jpeg_bytes(photo)})
    seen = []  # random erasing is called with each image of a batch, to change it in place
    train = loader(samples, 2, training=True, batch_size=2, channels_last=True,
                   random_erasing=lambda image: seen.append(image.clone()) or image.add_(1))
    batches = list(train)
    assert len(batches) == len(train) == 5 // 2 and train.bad_images == {}
    seen = [torch.stack(seen[index:index + 2]) for index in range(0, len(seen), 2)]
    for (images, labels), erased in zip(batches, seen):
        assert images.dtype == torch.float32 and images.shape == (len(labels), 3, 24, 24)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)
        torch.testing.assert_close(images, erased + 1)
        lowest = min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        assert erased.min() >= lowest - 1e-5 and erased.max() <= (1 - 0.406) / 0.225 + 1e-5
    val = loader(samples, 2, batch_size=5)
    images, _ = next(iter(val))
    tiny = torch.tensor([200, 30, 60]).view(3, 1, 1) / 255
    expected = (tiny - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(images[4], expected.expand(3, 24, 24), rtol=0, atol=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_leaving_an_epoch_early_then_iterating_again(tmp_path, device):
    """A consumer that breaks out and iterates again gets
    whole epochs, the same as a fresh loader's."""
    samples = jpeg_samples(tmp_path, count=10)
    val = loader(samples, batch_size=2, device=device, workers=1)
    fresh = [images.cpu() for images, _ in loader(samples, batch_size=2, device=device)]
    for images, _ in val:
        break
    abandoned = iter(val)  # left open while the next iteration starts
    next(abandoned)
    for _ in range(2):
        again = [images.cpu() for images, _ in val]
        assert len(again) == 5 and all(torch.equal(a, b) for a, b in zip(again, fresh))
        abandoned = None  # closing it leaves the iteration after it alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoding_leaves_memory_that_queued_kernels_read_alone(tmp_path):
    """Blocks that queued kernels still read are not written by the decoder: neither blocks freed
    on the caller's stream (torchvision's CUDA decode_jpeg writes from a stream that does not
    wait for the caller's; the first GPU runs of this loader ended in non-finite losses) nor
    decoded images retired while their reads are queued."""
    samples = jpeg_samples(tmp_path, count=16)
    paths = [path for path, _ in samples]
    encoded = [read_encoded(path) for path in paths]
    shapes = [tuple(data.shape) for data in decode_images(encoded, paths, JpegDecoder("cpu"))[0]]
    decoder = JpegDecoder("cuda")
    reference, _ = decode_images(encoded, paths, decoder)
    reference_sums = [int(image.sum(dtype=torch.int64)) for image in reference]
    wrong = 0
    for _ in range(20):
        # Blocks the size of the decoded images, summed after a delay, freed at once.
        blocks = [torch.full(shape, 7, dtype=torch.uint8, device="cuda") for shape in shapes]
        torch.cuda._sleep(40_000_000)
        sums = [block.sum(dtype=torch.int64) for block in blocks]
        expected = [7 * block.numel() for block in blocks]
        del blocks
        images, failures = decode_images(encoded, paths, decoder)
        assert not failures and [tuple(image.shape) for image in images] == shapes
        torch.cuda._sleep(40_000_000)
        image_sums = [image.sum(dtype=torch.int64) for image in images]  # queued reads
        decoder.retire(images)
        del images
        # Other images of the same sizes: written into the retired images' blocks, were they
        # reused before the queued sums ran.
        decode_images(encoded[::-1], paths[::-1], decoder)
        wrong += sum(int(total) != value for total, value in zip(sums, expected))
        wrong += sum(int(total) != value for total, value in zip(image_sums, reference_sums))
    assert wrong == 0
