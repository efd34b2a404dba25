from impq_onnx.cli import main

main()
