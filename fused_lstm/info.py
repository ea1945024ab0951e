"""`python -m fused_lstm.info`: prints fused_lstm.backend_info(), a line per key."""
from fused_lstm import backend_info


def main():
    for key, value in backend_info().items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
