"""Pure tensor maths: no Trainer, no PEFT, no I/O. Each function is testable with three lines of torch."""
