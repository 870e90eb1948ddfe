"""What both the server and the clients use: config, data, tasks, DP and accounting."""
