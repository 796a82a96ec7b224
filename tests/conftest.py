import os

# Tests never reach a model hub: everything loads from packaged assets.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def minilm_lora_factory():
    """Build the packaged MiniLM sequence classifier wrapped with PEFT LoRA (r=8 on query/value).

    Returns a function ``make(num_labels=2, r=8, seed=0) -> (peft_model, tokenizer)``; each call
    gives a fresh model (~1 s).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.assets import minilm_dir

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make(num_labels: int = 2, r: int = 8, seed: int = 0, **lora_kwargs):
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], lora_dropout=0.0,
                            modules_to_save=["classifier"], **lora_kwargs)
        model = get_peft_model(base, config)
        model.train()
        return model, tokenizer

    return make


@pytest.fixture
def quiet_lightning():
    """Silence the Lightning warnings that small CPU test runs trigger by design (few workers, short
    epochs, the pytree deprecation) and the step-size warning of deliberately short chains."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*StepSizeWarning.*")
        yield


def _on_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small vectorised chains gain nothing from OpenMP, and one
    thread keeps timings comparable on shared CPUs."""
    yield from _on_one_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """:func:`one_thread` for a whole module, its module-scoped fixtures included
    (``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``)."""
    yield from _on_one_thread()


def cuda_only(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))
