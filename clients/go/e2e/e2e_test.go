// Package e2e_test drives a running dembrane-webhooks service through the generated Go
// client, from the directory's facts to a webhook's delivery at a local receiver.
//
// `make test-clients` starts the service and sets E2E_GRPC_TARGET (host:port of its gRPC
// server) and E2E_JWT_SECRET (its WEBHOOKS_JWT_SECRET); without them the test is skipped.
// The service must let loopback targets through (WEBHOOKS_ALLOWED_TARGETS=127.0.0.0/8).
package e2e_test

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	webhooksv1 "dembrane.dev/webhooks/clients/go/dembrane/webhooks/v1"
)

const eventType = "conversation.summarized"

// received is one request the local receiver got.
type received struct {
	method string
	path   string
	header http.Header
	body   []byte
}

// mintToken signs an HS256 token for subject, with the given space-separated scopes.
func mintToken(t *testing.T, secret, subject, scope string) string {
	t.Helper()
	now := time.Now()
	claims := jwt.MapClaims{
		"sub": subject,
		"iat": now.Unix(),
		"exp": now.Add(10 * time.Minute).Unix(),
	}
	if scope != "" {
		claims["scope"] = scope
	}
	signed, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
	if err != nil {
		t.Fatalf("signing a token: %v", err)
	}
	return signed
}

// withToken carries the bearer token in the call's metadata.
func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func TestPublishedEventReachesTheReceiver(t *testing.T) {
	target, secret := os.Getenv("E2E_GRPC_TARGET"), os.Getenv("E2E_JWT_SECRET")
	if target == "" || secret == "" {
		t.Skip("E2E_GRPC_TARGET and E2E_JWT_SECRET name no running service")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	hits := make(chan received, 8)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		hits <- received{method: r.Method, path: r.URL.Path, header: r.Header.Clone(), body: body}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer receiver.Close()

	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dialing %s: %v", target, err)
	}
	defer conn.Close()

	// Fresh names on every run, so the test can run again against the same service.
	suffix := strings.ToLower(rand.Text()[:10])
	workspaceID, projectID := "go-ws-"+suffix, "go-p-"+suffix
	adminID, eventID := "go-admin-"+suffix, "go-evt-"+suffix
	backend := withToken(ctx, mintToken(t, secret, "go-backend", "webhooks:directory webhooks:publish"))
	admin := withToken(ctx, mintToken(t, secret, adminID, ""))

	directory := webhooksv1.NewDirectoryServiceClient(conn)
	if _, err := directory.UpsertWorkspace(backend, &webhooksv1.UpsertWorkspaceRequest{
		WorkspaceId: workspaceID, Name: "Go client workspace", Tier: "changemaker",
	}); err != nil {
		t.Fatalf("UpsertWorkspace: %v", err)
	}
	if _, err := directory.UpsertProject(backend, &webhooksv1.UpsertProjectRequest{
		ProjectId: projectID, WorkspaceId: workspaceID, Name: "Go client project", Language: "en",
	}); err != nil {
		t.Fatalf("UpsertProject: %v", err)
	}
	if _, err := directory.SetMembership(backend, &webhooksv1.SetMembershipRequest{
		WorkspaceId: workspaceID, UserId: adminID, Role: "admin",
	}); err != nil {
		t.Fatalf("SetMembership: %v", err)
	}

	webhooks := webhooksv1.NewWebhookServiceClient(conn)
	created, err := webhooks.CreateWebhook(admin, &webhooksv1.CreateWebhookRequest{
		ProjectId: projectID,
		Name:      "Go client receiver",
		Url:       receiver.URL + "/hooks/dembrane",
		Events:    []string{eventType},
	})
	if err != nil {
		t.Fatalf("CreateWebhook: %v", err)
	}
	webhookID, signingSecret := created.GetWebhook().GetId(), created.GetSecret()
	if webhookID == "" || signingSecret == "" {
		t.Fatalf("CreateWebhook answered no id or secret: %v", created)
	}

	published, err := webhooksv1.NewEventServiceClient(conn).PublishEvent(backend,
		&webhooksv1.PublishEventRequest{Event: &webhooksv1.Event{
			Id:        eventID,
			Type:      eventType,
			ProjectId: projectID,
			OccurTime: timestamppb.Now(),
			Subject: &webhooksv1.Event_Conversation{Conversation: &webhooksv1.Conversation{
				Id:              "conv-" + suffix,
				ParticipantName: proto.String("Sam"),
				IsFinished:      true,
				Summary:         proto.String("Sam asked for more benches in the park."),
			}},
		}})
	if err != nil {
		t.Fatalf("PublishEvent: %v", err)
	}
	if result := published.GetResult(); result.GetEventId() != eventID || result.GetDeliveryCount() != 1 {
		t.Fatalf("PublishEvent answered %v, want event %s with one delivery", result, eventID)
	}

	var hit received
	select {
	case hit = <-hits:
	case <-ctx.Done():
		t.Fatal("the receiver got no request")
	}
	if hit.method != http.MethodPost || hit.path != "/hooks/dembrane" {
		t.Errorf("the receiver got %s %s, want POST /hooks/dembrane", hit.method, hit.path)
	}
	if got := hit.header.Get("webhook-id"); got != eventID {
		t.Errorf("webhook-id is %q, want %q", got, eventID)
	}
	if got := hit.header.Get("X-Dembrane-Event"); got != eventType {
		t.Errorf("X-Dembrane-Event is %q, want %q", got, eventType)
	}
	mac := hmac.New(sha256.New, []byte(signingSecret))
	mac.Write(hit.body)
	if want := "sha256=" + hex.EncodeToString(mac.Sum(nil)); hit.header.Get("X-Dembrane-Signature") != want {
		t.Errorf("X-Dembrane-Signature is %q, want %q", hit.header.Get("X-Dembrane-Signature"), want)
	}
	var body struct {
		ID      string `json:"id"`
		Event   string `json:"event"`
		Project struct {
			ID string `json:"id"`
		} `json:"project"`
	}
	if err := json.Unmarshal(hit.body, &body); err != nil {
		t.Fatalf("the body is no JSON object: %v: %s", err, hit.body)
	}
	if body.ID != eventID || body.Event != eventType || body.Project.ID != projectID {
		t.Errorf("the body names event %q of type %q in project %q", body.ID, body.Event, body.Project.ID)
	}

	// The outcome is stored just after the receiver answers: wait for it.
	for {
		listed, err := webhooks.ListDeliveries(admin, &webhooksv1.ListDeliveriesRequest{
			ProjectId: projectID, WebhookId: webhookID,
		})
		if err != nil {
			t.Fatalf("ListDeliveries: %v", err)
		}
		deliveries := listed.GetDeliveries()
		if len(deliveries) != 1 || deliveries[0].GetEventId() != eventID {
			t.Fatalf("ListDeliveries answered %v, want the one delivery of %s", deliveries, eventID)
		}
		if deliveries[0].GetStatus() == webhooksv1.DeliveryStatus_DELIVERY_STATUS_SUCCEEDED {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the delivery is still %v", deliveries[0].GetStatus())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
