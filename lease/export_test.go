package lease

// Attempts returns how many acquire statements c has sent.
func Attempts(c *Client) int64 { return c.attempts.Load() }
