// Command loadgen sends unary gRPC calls at a steady rate and reports when each was sent
// and how long its answer took: the latency scenario's load generator.
//
// Requests arrive already serialized on standard input, each as a 4-byte big-endian length
// followed by that many bytes, and are sent as they are (a codec that passes bytes
// through), so the benchmark's Python side keeps defining what is published. The schedule
// is open-loop: call i starts at start + i/rate whether or not earlier calls have been
// answered, each on a goroutine of its own.
//
// Standard output gets one line per call, in the order of the input:
//
//	<sent, Unix nanoseconds> <answer time, nanoseconds> <status code>
//
// and the last line is "offered <calls started per second>".
//
// Written in Go so that the load generator takes little of the machine it shares with
// the service: a Python asyncio client spends about as much CPU per call as the service's
// own event loop does.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rawCodec sends and receives messages as the bytes they already are.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("loadgen: cannot send a %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("loadgen: cannot receive into a %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// Name is "proto": the server sees the usual content type, application/grpc+proto.
func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

type result struct {
	sent    int64
	latency int64
	code    uint32
}

func readRequests(r io.Reader) ([][]byte, error) {
	in := bufio.NewReaderSize(r, 1<<20)
	var requests [][]byte
	var size [4]byte
	for {
		if _, err := io.ReadFull(in, size[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return requests, nil
			}
			return nil, fmt.Errorf("reading a request's length: %w", err)
		}
		body := make([]byte, binary.BigEndian.Uint32(size[:]))
		if _, err := io.ReadFull(in, body); err != nil {
			return nil, fmt.Errorf("reading a request: %w", err)
		}
		requests = append(requests, body)
	}
}

func connect(ctx context.Context, conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn.Connect()
	for state := conn.GetState(); state != connectivity.Ready; state = conn.GetState() {
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("no connection to the server within 10 s (%v)", state)
		}
	}
	return nil
}

func run() error {
	target := flag.String("target", "", "the server's host:port")
	method := flag.String("method", "", "the full method name, /package.Service/Method")
	rate := flag.Float64("rate", 500, "calls started per second")
	timeout := flag.Duration("timeout", time.Minute, "each call's deadline")
	flag.Parse()
	if *target == "" || *method == "" || *rate <= 0 {
		return errors.New("usage: loadgen -target HOST:PORT -method /pkg.Service/Method [-rate N]")
	}
	requests, err := readRequests(os.Stdin)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(
		*target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
	)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx := context.Background()
	if auth := os.Getenv("LOADGEN_AUTHORIZATION"); auth != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", auth)
	}
	// The connection is made before the clock starts.
	if err := connect(ctx, conn); err != nil {
		return err
	}

	results := make([]result, len(requests))
	var wg sync.WaitGroup
	interval := float64(time.Second) / *rate
	start := time.Now()
	for i := range requests {
		due := start.Add(time.Duration(float64(i) * interval))
		if wait := time.Until(due); wait > 0 {
			time.Sleep(wait)
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			callCtx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			var reply []byte
			sent := time.Now()
			err := conn.Invoke(callCtx, *method, &requests[i], &reply)
			results[i] = result{sent.UnixNano(), int64(time.Since(sent)), uint32(status.Code(err))}
		}(i)
	}
	spent := time.Since(start)
	wg.Wait()

	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	for _, r := range results {
		fmt.Fprintf(out, "%d %d %d\n", r.sent, r.latency, r.code)
	}
	offered := 0.0
	if spent > 0 {
		offered = float64(len(requests)) / spent.Seconds()
	}
	fmt.Fprintf(out, "offered %f\n", offered)
	return out.Flush()
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}
