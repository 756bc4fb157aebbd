from camface.cli import run

run()
