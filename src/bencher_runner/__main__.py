from bencher_runner.cli import main

main()
