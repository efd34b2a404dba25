from impq_onnx.interrupts import run

run()
